"""`slidestream train cdma` end to end on real synthetic slides: ingest → 2-worker Ray Train (gloo) for CDMA
and the supervised-only run → slide inference on the held-out slide → metrics.json, masks, overlays,
GeoJSON; a rerun resumes (nothing retrained), a changed setting is refused by name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slidestream.cli import main
from slidestream.cluster.config import load_config
from slidestream.cluster.init_weights import MissingWeightsError
from slidestream.cluster.recipes import PAPER_RECIPES
from slidestream.pipelines.annotations import GeoJSONMask, Region
from slidestream.pipelines.ingest import run_ingest
from slidestream.testing.helpers import make_config
from slidestream.trainers.cdma.run import (
    CDMAJob,
    CDMARun,
    encoder_weights,
    make_optimizer,
    set_learning_rate,
)
from slidestream.trainers.models.mtnet import build_mtnet

TILING = ("tiling.mpp=2.0", "tiling.tile_px=64")
SETTINGS = (
    *TILING,
    "ray.num_cpus=2",
    "cdma.network=light",
    "cdma.weights=random",
    "cdma.epochs=2",
    "cdma.steps_per_epoch=2",
    "cdma.batch_size=4",
    "cdma.unsup_start_epoch=1",
    "cdma.milestones=[1]",
    "cdma.labelled_frac=0.5",
    "cdma.test_frac=0.25",
    "cdma.val_slides=1",
    "cdma.workers=2",
    "cdma.max_failures=0",
)


def test_learning_rate_groups_and_step_schedule() -> None:
    cfg = make_config("cdma.lr=0.001", "cdma.milestones=[2,4]").cdma
    optimizer = make_optimizer(build_mtnet(2, "light"), cfg)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx(
        {"pretrained_weight": 1e-3, "pretrained_bias": 2e-3, "new_weight": 1e-2, "new_bias": 2e-2}
    )
    assert optimizer.defaults["nesterov"] and optimizer.defaults["weight_decay"] == 5e-4
    assert [set_learning_rate(optimizer, cfg, e) for e in (0, 1, 2, 4)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-5]
    )
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(2e-4)  # new biases: 20 × 1e-5


@pytest.fixture(scope="module")
def ingested(slide_root: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("cdma") / "out"
    report = run_ingest(str(slide_root), str(out), make_config(*TILING))
    assert not report.failed
    return str(out)


def test_train_cdma_end_to_end_with_resume(ray_local, slide_root: Path, ingested: str) -> None:
    argv = ["train", "cdma", "--name", "seg", "--out", ingested, "--annotations", str(slide_root / "masks")]
    overrides = [x for s in SETTINGS for x in ("--set", s)]
    assert main([*argv, *overrides, "--set", "cdma.weights=null"]) == 2  # random init is never implied
    assert main([*argv, *overrides]) == 0
    run = Path(ingested) / "runs" / "seg"
    metrics = json.loads((run / "metrics.json").read_text())
    split = metrics["split"]
    assert len(split["test"]) == 1 and len(split["val"]) == 1 and len(split["labelled"]) == 1
    assert set(metrics["runs"]) == {"cdma", "supervised"}
    test_slide = split["test"][0]
    for name, result in metrics["runs"].items():
        (row,) = result["slides"]
        assert row["slide_id"] == test_slide and row["windows"] > 0
        assert 0 <= row["dice"] <= 1 and 0 <= row["jaccard"] <= row["dice"] + 1e-9
        assert set(result["mean"]) >= {"dice", "jaccard"} and "dice" in result["std"]
        history = result["history"]
        assert [h["epoch"] for h in history] == [0, 1]
        assert history[1]["lr"] == pytest.approx(history[0]["lr"] * 0.1)
        # the unsupervised terms count from unsup_start_epoch, and never in the supervised-only run
        assert "loss_kd" not in history[0]
        assert ("loss_kd" in history[1]) == (name == "cdma")
        base = run / "slides" / name / test_slide
        mask = np.asarray(Image.open(f"{base}.mask.png"))
        assert mask.shape == (6144 // 32, 8192 // 32)
        assert Image.open(f"{base}.overlay.png").size[0] > 0
        polygons = GeoJSONMask(f"{base}.geojson", test_slide, ["background", "tumour"])
        back = polygons.region(Region(0, 0, mask.shape[1], mask.shape[0], 32.0))
        assert np.mean(back == mask) > 0.95
        weights = torch.load(run / "jobs" / name / "weights.pt", weights_only=True)
        assert "decoders.0.tail.5.weight" in weights
        assert list((run / "ray" / name).glob("checkpoint_*"))
    result = json.loads((run / "jobs" / "cdma" / "result.json").read_text())
    assert result["tiles"]["unlabelled"] > 0 and result["steps_per_epoch"] == 2

    before = (run / "jobs" / "cdma" / "weights.pt").stat().st_mtime_ns
    assert main([*argv, *overrides]) == 0  # resumes: finished jobs are kept, only inference reruns
    assert (run / "jobs" / "cdma" / "weights.pt").stat().st_mtime_ns == before
    assert main([*argv, *overrides, "--set", "cdma.epochs=3"]) == 2  # refused, names the setting


def test_cdma_refuses_an_implied_random_init(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=r"cdma\.weights is not set.*ResNet-50"):
        CDMARun("run", str(tmp_path), make_config())
    with pytest.raises(MissingWeightsError, match=r"ResNet-18.*cdma\.weights=random"):
        encoder_weights(make_config("cdma.network=light").cdma)
    assert encoder_weights(make_config("cdma.weights=random").cdma) is None


# the official training script's recipe, key by key (PAPER_RECIPES["cdma"] must equal it)
PAPER_CDMA = {
    "network": "official",
    "labelled_frac": 0.1,
    "batch_size": 16,
    "epochs": 150,
    "steps_per_epoch": None,
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "milestones": [37, 75, 112],
    "unsup_start_epoch": 15,
    "kd_weight": 0.1,
    "entropy_weight": 0.1,
    "temperature": 10.0,
    "noise_std": 0.1,
    "noise_p": 0.25,
    "infer_overlap": 0.25,
}


def test_paper_recipe_is_the_official_one() -> None:
    assert PAPER_RECIPES["cdma"] == {f"cdma.{key}": value for key, value in PAPER_CDMA.items()}
    paper = load_config(None, ["cdma.recipe=paper", "cdma.epochs=3"]).cdma
    assert paper.recipe == "paper" and paper.epochs == 3  # a setting given stays the user's
    assert {k: getattr(paper, k) for k in PAPER_CDMA if k != "epochs"} == {
        k: v for k, v in PAPER_CDMA.items() if k != "epochs"
    }
    assert load_config(None, ["cdma.recipe=paper"]).cdma.epochs == 150


def test_job_config_round_trips() -> None:
    job = CDMAJob("cdma", True, "/o", {}, {}, ["a"], ["b"], [], "/o/r")
    assert CDMAJob(**job.to_config()) == job


def test_cdma_sweep_trial_is_a_ray_train_run_scored_by_validation_dice(
    ray_local, slide_root: Path, ingested: str, tmp_path: Path
) -> None:
    """A trial is a Ray Train run (1 worker) of the semi-supervised job, reported once when it ends (one
    trial here: a Ray Train fit is the costly part; comparing trials is tested in test_tune.py)."""
    space = tmp_path / "space.yaml"
    space.write_text("cdma.lr: {loguniform: [1.0e-3, 1.0e-2]}\n")
    settings = [x for s in SETTINGS for x in ("--set", s)]
    argv = ["tune", "cdma", "--name", "seg-sweep", "--out", ingested, "--space", str(space), "--trials", "1",
            "--annotations", str(slide_root / "masks"), *settings]  # fmt: skip
    assert main([*argv, "--workers", "1"]) == 0
    root = Path(ingested) / "tune" / "seg-sweep"
    with open(root / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and 1e-3 <= float(rows[0]["cdma.lr"]) <= 1e-2
    for row in rows:
        result = json.loads((root / "trials" / row["trial"] / "result.json").read_text())
        assert int(row["epochs"]) == 2 and not row["error"]
        assert float(row["val_dice"]) == pytest.approx(max(h["val_dice"] for h in result["history"]))
        assert "loss_kd" in result["history"][1]  # the semi-supervised job, not the supervised twin
    best = load_config(root / "best_config.yaml")
    assert best.cdma.lr == pytest.approx(float(max(rows, key=lambda r: float(r["val_dice"]))["cdma.lr"]))
    assert best.cdma.workers == 1 and best.cdma.annotations == str(slide_root / "masks")

    # trials are compared on validation slides: a split without any is refused before Ray starts
    assert main([*argv, "--name", "no-val", "--set", "cdma.val_slides=0"]) == 2
    assert not (root.parent / "no-val").exists()
