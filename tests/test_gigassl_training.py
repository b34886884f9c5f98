"""Giga-SSL training, export and probing: the run's protocol on small view bags in-process (resume,
refused changes and inputs, export, LARS, schedule), and the learning test on slides made by our own
pipeline (hard synthetic slides → tiles → views from the pretrained `resnet10t_64`) with a real 2-worker
Ray Train run, probed beside the mean-pooled-features baseline and the same network untrained."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from slidestream.cli import main
from slidestream.pipelines.features import BagMeta, bag_table, write_bag
from slidestream.testing.cohort import PIPELINE, EmbeddedCohort
from slidestream.testing.helpers import make_config
from slidestream.trainers.data import TrainDataError
from slidestream.trainers.gigassl.probe import read_embeddings, run_probe
from slidestream.trainers.gigassl.train import (
    GigaSSLRun,
    build_net,
    export_embeddings,
    format_gigassl,
    global_batch,
)
from slidestream.trainers.optim import LARS, warmup_cosine

SMALL = ("gigassl.workers=0", "gigassl.epochs=30", "gigassl.batch_size=16", "gigassl.dim=32",
         "gigassl.proj_dim=16", "gigassl.warmup_epochs=1", "gigassl.lr=0.001",
         "gigassl.export_chunks=4", "gigassl.init_weights=random")  # fmt: skip


def _write_views(root: Path, n: int, seed: int = 0, dim: int = 16) -> None:
    """Small view bags: 3 augmentations × 10 tiles on a 512-px grid; each slide's tiles scatter around a
    mean of its own, so two views of a slide are alike."""
    rng = np.random.default_rng(seed)
    meta = BagMeta("synthetic", dim, 0.5, 256, "test")
    for i in range(n):
        xy = rng.integers(0, 12, size=(30, 2)) * 512
        feats = rng.normal(size=dim) + 0.5 * rng.normal(size=(30, dim))
        table = bag_table(xy[:, 0], xy[:, 1], feats, meta, aug=np.repeat(np.arange(3), 10), dtype="float32")
        write_bag(str(root / f"s{i}.parquet"), table)


@pytest.fixture()
def small_views(tmp_path: Path) -> Path:
    _write_views(tmp_path / "views", 16)
    return tmp_path / "views"


def test_schedule_and_batch_rules():
    factors = [warmup_cosine(s, 4, 20) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0
    assert factors[12] == pytest.approx(0.5) and factors[20] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[4:]))
    assert global_batch(10, 256, 2) == 10 and global_batch(11, 4, 2) == 4 and global_batch(7, 256, 2) == 6
    with pytest.raises(TrainDataError, match="1 slides"):
        global_batch(1, 256, 1)


def test_lars_scales_weight_steps_by_the_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])  # ‖g‖ = 2
    LARS([w, b], lr=0.1, momentum=0.9, eta=0.001).step()
    assert torch.allclose(w, torch.tensor([[3.0, 4.0 - 0.1 * 0.001 * 5 / 2 * 2]]))
    assert torch.allclose(b, torch.tensor([1.0 - 0.1 * 0.5]))  # 1-D: plain SGD


def test_run_trains_exports_and_refuses_changes(ray_local, small_views, tmp_path):
    out = str(tmp_path / "out")
    config = make_config(*SMALL)
    summary = GigaSSLRun("r", out, str(small_views), config).execute()
    run = Path(summary.run_dir)
    losses = [h["train_loss"] for h in summary.history]
    assert [h["epoch"] for h in summary.history] == list(range(30)) and all(np.isfinite(losses))
    # a slide's views are recognised among the others' (the loss at τ = 0.05 is noisy step to step)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    ids, emb = read_embeddings(summary.embeddings)
    assert sorted(ids) == sorted(f"s{i}" for i in range(16)) and emb.shape == (16, 32)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    state = torch.load(run / "weights.pt", weights_only=True)
    assert "pool.conv1.weight" in state and (run / "curves.png").stat().st_size > 1000

    with pytest.raises(TrainDataError, match=r"gigassl\.tau \(0\.05 → 0\.1\)"):
        GigaSSLRun("r", out, str(small_views), make_config(*SMALL, "gigassl.tau=0.1")).execute()
    # an export setting may change on a rerun: nothing is retrained, only the export is redone
    rerun = GigaSSLRun(
        "r", out, str(small_views), make_config(*SMALL, "gigassl.export_bn=recalibrate")
    ).execute()
    assert rerun.history == summary.history

    # export keeps training's running BatchNorm statistics (the official export); recalibrate recomputes
    # them over the exported slides, so running ones scrambled in a copy of the run no longer matter
    scrambled = tmp_path / "scrambled"
    shutil.copytree(run, scrambled, ignore=shutil.ignore_patterns("ray"))
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            state[key] = value + torch.rand_like(value)
    torch.save(state, scrambled / "weights.pt")
    embed = {(str(where), bn): read_embeddings(export_embeddings(str(where), str(small_views),
                                                                 str(tmp_path / f"{where.name}-{bn}.parquet"),
                                                                 export_bn=bn))[1]
             for where in (run, scrambled) for bn in ("recalibrate", "running")}  # fmt: skip
    assert np.allclose(embed[str(run), "running"], emb, atol=1e-6)  # what the run exported by default
    assert not np.allclose(embed[str(run), "recalibrate"], emb, atol=1e-3)
    assert np.allclose(embed[str(scrambled), "recalibrate"], embed[str(run), "recalibrate"], atol=1e-5)
    assert not np.allclose(embed[str(scrambled), "running"], embed[str(run), "running"], atol=1e-3)

    # export for other slides (plain feature bags work too: one augmentation each)
    other = tmp_path / "other"
    meta = BagMeta("synthetic", 16, 0.5, 256, "test")
    write_bag(str(other / "new.parquet"), bag_table([0, 512, 0], [0, 0, 512], np.ones((3, 16)), meta))
    target = export_embeddings(str(run), str(other), str(tmp_path / "new.parquet"))
    new_ids, new_emb = read_embeddings(target)
    assert new_ids == ["new"] and new_emb.shape == (1, 32)
    meta8 = BagMeta("synthetic", 8, 0.5, 256, "test")
    write_bag(str(tmp_path / "d8" / "x.parquet"), bag_table([0], [0], np.ones((1, 8)), meta8))
    with pytest.raises(TrainDataError, match="8-d features"):
        export_embeddings(str(run), str(tmp_path / "d8"))


def test_zero_epochs_export_the_network_at_its_initialisation(ray_local, small_views, tmp_path):
    """`gigassl.epochs=0`: nothing is trained; the run exports the network its seed initialises (the
    untrained baseline of a probe), with no curve and an empty history."""
    summary = GigaSSLRun("init", str(tmp_path / "out"), str(small_views),
                         make_config(*SMALL, "gigassl.epochs=0")).execute()  # fmt: skip
    run = Path(summary.run_dir)
    assert summary.history == [] and not (run / "curves.png").exists()
    torch.manual_seed(0)  # gigassl.seed
    fresh = build_net(make_config(*SMALL).gigassl.model_dump(), 16).state_dict()
    saved = torch.load(run / "weights.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in fresh.items())
    ids, emb = read_embeddings(summary.embeddings)
    assert len(ids) == 16 and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert "no training" in format_gigassl(summary)


def test_too_few_slides_are_refused_before_anything_is_written(tmp_path):
    _write_views(tmp_path / "views", 1)
    with pytest.raises(TrainDataError, match="1 slides cannot fill a batch"):
        GigaSSLRun("r", str(tmp_path / "out"), str(tmp_path / "views"), make_config(*SMALL))
    assert not (tmp_path / "out").exists()


def test_probe_reports_auc_per_training_size_and_draws_the_map(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(40)]
    labels = ["tumour" if i % 2 else "normal" for i in range(40)]
    emb = rng.normal(size=(40, 8)) + np.array([[1.5 * (i % 2)] + [0] * 7 for i in range(40)])
    import pyarrow as pa

    pq.write_table(pa.table({"slide_id": ids, "embedding": emb.tolist()}), tmp_path / "emb.parquet")
    (tmp_path / "labels.csv").write_text(
        "slide_id,label\n" + "".join(f"{s},{y}\n" for s, y in zip(ids, labels, strict=True))
    )
    report = run_probe(str(tmp_path / "emb.parquet"), str(tmp_path / "labels.csv"), sizes=(10, 50), repeats=5)
    stats = report.results["gigassl"]
    assert set(stats) == {"full", "10"}  # 50 is not smaller than the training part (28 slides)
    assert stats["full"]["n_train"] == 28 and stats["10"]["n_train"] == 10
    assert stats["full"]["auc_mean"] > 0.8 and stats["full"]["repeats"] == 5
    saved = json.loads((tmp_path / "probe.json").read_text())
    assert saved["results"]["gigassl"]["full"]["auc_mean"] == stats["full"]["auc_mean"]
    with Image.open(tmp_path / "embedding_map.png") as image:
        assert image.width > 300

    (tmp_path / "bad.csv").write_text("slide_id,label\nother,1\n")
    assert main(["probe", "--embeddings", str(tmp_path / "emb.parquet"), "--labels",
                 str(tmp_path / "bad.csv")]) == 2  # fmt: skip


# -- learning test: data made by our pipeline, a real 2-worker run ----------------------------------------

# T = 5 tiles per view, batch 8 slides over 2 workers (4 each), 20 epochs of 3 steps; both networks are
# exported with BatchNorm statistics recomputed over the exported slides
LEARN = ("gigassl.epochs=20", "gigassl.batch_size=8", "gigassl.warmup_epochs=2", "gigassl.lr=0.001",
         "gigassl.init_weights=random", "gigassl.export_bn=recalibrate")  # fmt: skip


def _probe(embeddings: Path, data: EmbeddedCohort, baseline: bool) -> dict:
    extra = ["--baseline-features", data.features["pretrained"]] if baseline else []
    args = ["probe", "--embeddings", str(embeddings), "--labels", data.labels, "--sizes", "8",
            "--repeats", "20", *extra]  # fmt: skip
    assert main(args) == 0
    return json.loads((embeddings.parent / "probe.json").read_text())["results"]


def test_two_worker_run_on_pretrained_views_is_probed_beside_its_untrained_network(hard_cohort, capsys):
    """Giga-SSL on views of the pretrained tile encoder (hard cohort): a real 2-worker Ray Train run, its
    exported slide embeddings probed (standardised, the probe's default) beside the mean-pooled tile
    features and beside the same network at its initialisation (`gigassl.epochs=0`, exported the same
    way); the run resumes from its checkpoint.

    Issue 23 asks for a probe AUC ≥ 0.85 that beats the untrained network. The first half holds: the
    trained embeddings carry the label (in-process on this cohort, seed 0: 0.931; seeds 1-4: 0.872, 0.916,
    0.919, 0.796; bench/RESULTS.md). The second does not: the untrained network probes at 0.912 (seeds 1-4:
    0.938, 0.919, 0.959, 0.900), so training adds nothing here: the views of a hard slide find their own
    slide across augmentations barely above chance (bench/gigassl_signal.py: 0.06 against 0.04), which
    leaves NT-Xent little slide identity to learn from. The colour jitter erases it (`--ablate`); views
    made without it keep 5-6× chance, and training was still level with the untrained network (0.921
    against 0.923 over seeds 0-2 at lr 1e-4). The raw probe of the official script gave the
    embeddings 0.46-0.64: at C = 10 it over-regularises unit-norm embeddings, whose slides differ by
    little."""
    data = hard_cohort
    common = ["--out", data.out, *itertools.chain.from_iterable(("--set", s) for s in (*PIPELINE, *LEARN))]
    views = ["--features", data.views["pretrained"]]
    train = ["train", "gigassl", "--name", "learn", "--workers", "2", *views, *common]
    assert main(train) == 0
    run = Path(data.out) / "runs" / "learn"
    result = json.loads((run / "result.json").read_text())
    assert result["workers"] == 2 and result["batch"] == 8
    losses = [h["train_loss"] for h in result["history"]]
    assert len(losses) == 20 and all(np.isfinite(losses))
    # embedded from the slides' un-augmented tile features (the bags beside the views), as at inference
    meta = pq.read_schema(run / "embeddings.parquet").metadata
    assert meta[b"slidestream.views"].decode() == data.features["pretrained"]

    # the untrained baseline: the same network and seed, no epoch trained, exported the same way
    untrained = ["train", "gigassl", "--name", "untrained", "--workers", "0", *views, *common,
                 "--set", "gigassl.epochs=0"]  # fmt: skip
    assert main(untrained) == 0
    initial = Path(data.out) / "runs" / "untrained"
    assert json.loads((initial / "result.json").read_text())["history"] == []
    start = torch.load(initial / "weights.pt", weights_only=True)
    trained = torch.load(run / "weights.pt", weights_only=True)
    assert not torch.equal(start["pool.conv1.weight"], trained["pool.conv1.weight"])

    results = _probe(run / "embeddings.parquet", data, baseline=True)
    table = capsys.readouterr().out
    before = _probe(initial / "embeddings.parquet", data, baseline=False)["gigassl"]
    auc, auc_before = results["gigassl"]["full"]["auc_mean"], before["full"]["auc_mean"]
    baseline = results["mean-pooled features"]["full"]["auc_mean"]
    with capsys.disabled():
        print(f"\nGiga-SSL learning test (losses {losses[0]:.3f} → {losses[-1]:.3f}; untrained network "
              f"{auc_before:.3f} ± {before['full']['auc_std']:.3f}):\n{table}")  # fmt: skip
    assert baseline >= 0.85, (auc, auc_before, baseline)  # the pretrained features carry the label
    assert auc >= 0.85, (auc, auc_before, baseline)  # and so do the trained slide embeddings
    assert np.isfinite(auc_before), (auc, auc_before, baseline)
    assert (run / "embedding_map.png").stat().st_size > 5000

    # resume: the last epoch checkpoint is the starting point, so no epoch is trained again
    (run / "result.json").unlink()
    (run / "weights.pt").unlink()
    assert main(train) == 0
    assert json.loads((run / "result.json").read_text())["history"] == result["history"]
