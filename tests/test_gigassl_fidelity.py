"""Giga-SSL as the official code trains it: the 224-level-0-px map cell, one forward pass per view set,
the ImageNet layer4 start never implied away, and the paper recipe row (epoch 1000 of 3000)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from slidestream.cluster.config import GigaSSLConfig, load_config
from slidestream.cluster.init_weights import MissingWeightsError
from slidestream.cluster.recipes import PAPER_RECIPES
from slidestream.pipelines.features import BagMeta, FeatureBags, bag_table, write_bag
from slidestream.testing.helpers import make_config
from slidestream.trainers.data import BagCache, TrainDataError
from slidestream.trainers.gigassl.ntxent import ntxent
from slidestream.trainers.gigassl.sparse_maps import build_batch
from slidestream.trainers.gigassl.train import GigaSSLRun, ViewMaker, build_net, lr_factor, step_loss

DIM = 8


def _views(root: Path, n: int = 4) -> FeatureBags:
    """n slides × 2 augmentations × 6 tiles on a 512-level-0-px tile grid."""
    rng = np.random.default_rng(0)
    meta = BagMeta("synthetic", DIM, 0.5, 256, "test")
    for i in range(n):
        xy = rng.integers(0, 8, size=(12, 2)) * 512
        table = bag_table(xy[:, 0], xy[:, 1], rng.normal(size=(12, DIM)), meta, aug=np.repeat([0, 1], 6))
        write_bag(str(root / f"s{i}.parquet"), table)
    return FeatureBags(str(root), require_labels=False)


def test_map_cell_defaults_to_the_official_224_level0_px(tmp_path):
    cfg = GigaSSLConfig().model_dump()
    assert cfg["cell_px"] == 224.0
    bag = next(iter(_views(tmp_path)))
    assert ViewMaker(BagCache(_views(tmp_path), 0), cfg).cell(bag) == 224.0  # not the 512-px tile grid
    assert ViewMaker(BagCache(_views(tmp_path), 0), {**cfg, "cell_px": None}).cell(bag) == 512.0


def test_each_view_set_has_its_own_forward_pass_and_batchnorm_batch(tmp_path):
    bags = _views(tmp_path)
    cfg = {**GigaSSLConfig().model_dump(), "init_weights": "random", "dim": 16, "proj_dim": 8}
    torch.manual_seed(0)
    net = build_net(cfg, DIM).train()
    passes: list[int] = []
    net.pool.register_forward_hook(lambda module, args, out: passes.append(args[0].batch_size))
    ids = list(bags.slide_ids)
    views = ViewMaker(BagCache(bags, 0), cfg)
    loss = step_loss(net, views, ids, np.random.default_rng(1), 0.05, torch.device("cpu"))
    assert passes == [4, 4]  # two passes of 4 slides each, not one of 8 views

    rng = np.random.default_rng(1)  # the same views again
    first, second = ([views.view(s, rng) for s in ids] for _ in range(2))
    with torch.no_grad():
        z1, z2 = (net(build_batch(maps).tensor())[1] for maps in (first, second))
        stacked = net(build_batch(first + second).tensor())[1]
    assert torch.allclose(loss, ntxent(z1, z2, 0.05), atol=1e-5)
    assert not torch.allclose(loss, ntxent(stacked[:4], stacked[4:], 0.05), atol=1e-3)


def test_layer4_start_is_never_implied(tmp_path):
    _views(tmp_path / "views")
    small = ("gigassl.workers=0", "gigassl.batch_size=4")
    with pytest.raises(MissingWeightsError, match=r"gigassl\.init_weights.*ResNet-18.*init_weights=random"):
        GigaSSLRun("r", str(tmp_path / "out"), str(tmp_path / "views"), make_config(*small))
    assert not (tmp_path / "out").exists()
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_net({**GigaSSLConfig().model_dump(), "init_weights": str(tmp_path / "nope.pth")}, 256)
    assert build_net({**GigaSSLConfig().model_dump(), "init_weights": "random"}, 256).pool.in_dim == 256
    run = GigaSSLRun("r", str(tmp_path / "out"), str(tmp_path / "views"),
                     make_config(*small, "gigassl.init_weights=random"))  # fmt: skip
    assert run.plan()["gigassl"]["init_weights"] == "random"


PAPER = {  # the official configuration and training loop (spec), key by key
    "gigassl.epochs": 1000, "gigassl.schedule_epochs": 3000, "gigassl.warmup_epochs": 10,
    "gigassl.batch_size": 256, "gigassl.lr": None, "gigassl.optimizer": "adam", "gigassl.weight_decay": 0.0,
    "gigassl.n_tiles": 5, "gigassl.tau": 0.05, "gigassl.cell_px": 224.0, "gigassl.dim": 512,
    "gigassl.proj_dim": 256, "gigassl.export_bn": "running",
}  # fmt: skip


def test_paper_recipe_row_is_the_official_recipe_and_load_config_resolves_it(tmp_path):
    assert PAPER_RECIPES["gigassl"] == PAPER
    resolved = load_config(None, ["gigassl.recipe=paper"]).gigassl.model_dump()
    assert {f"gigassl.{k}": resolved[k] for k in (key.split(".", 1)[1] for key in PAPER)} == PAPER
    _views(tmp_path / "views")
    short = make_config("gigassl.workers=0", "gigassl.batch_size=4", "gigassl.init_weights=random",
                        "gigassl.epochs=20", "gigassl.schedule_epochs=10")  # fmt: skip
    with pytest.raises(TrainDataError, match=r"gigassl\.schedule_epochs \(10\).*gigassl\.epochs \(20\)"):
        GigaSSLRun("r", str(tmp_path / "out"), str(tmp_path / "views"), short)


def test_training_stops_inside_the_schedule():
    """Epoch 1000 of 3000: the learning rate at the stop is the cosine's value there, not 0."""
    cfg = {"epochs": 1000, "schedule_epochs": 3000, "warmup_epochs": 10}
    factor = lr_factor(cfg, steps_per_epoch=2)
    assert factor(0) == 1 / 20 and factor(19) == 1.0
    assert factor(2000) == pytest.approx(0.5 * (1 + np.cos(np.pi * 990 / 2990)))  # ≈ 0.75
    assert factor(5999) == pytest.approx(0.0, abs=1e-5)
    own = lr_factor({**cfg, "schedule_epochs": None}, steps_per_epoch=2)  # unset: it ends at the stop
    assert own(1999) == pytest.approx(0.0, abs=1e-5)
