"""MIL epoch selection and the pooled logistic-regression baseline in real runs (Ray Train, in-process
workers): the fixed-epoch protocol, the baseline beside the model's metrics on the same folds, and a
selection that never sees the test part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from slidestream.pipelines.features import BagMeta, FeatureBags, bag_table, write_bag
from slidestream.testing.bags import with_split, write_bags
from slidestream.testing.helpers import make_config
from slidestream.trainers.data import BagCache, LabelledBags
from slidestream.trainers.mil.loop import FoldJob, evaluate
from slidestream.trainers.mil.runner import format_table, run_training
from slidestream.trainers.models import build_model

FAST = ("train.workers=0", "train.parallel_folds=1", "train.lr=1e-3")


@pytest.fixture(scope="module")
def bags(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("selection-bags")
    labels = write_bags(str(root), n_slides=24, dim=16, n_instances=(8, 16), witness_frac=0.3, patients=True)
    return str(root / "features"), labels


def _result(run: Path, job: str) -> dict:
    return json.loads((run / "jobs" / job / "result.json").read_text())


def _val_loss(weights: Path, features: str, labels: str, fold: int) -> float:
    """Mean loss of saved weights over the fold's validation bags (the trainer's own evaluation)."""
    plan = json.loads((weights.parents[2] / "run.json").read_text())
    split = plan["splits"][fold]
    model = build_model("abmil", plan["dim"], 2)
    model.load_state_dict(torch.load(weights, weights_only=True))
    target = LabelledBags.open(features, labels).target_of()
    job = FoldJob(
        name="check", kind="mil", seed=0, fold=fold, train_ids=split["train"], val_ids=split["val"],
        test_ids=split["test"], targets=target, classes=plan["classes"], features=features, dim=plan["dim"],
        result_dir="", train={},
    )  # fmt: skip
    return evaluate(model, split["val"], job, BagCache(FeatureBags(features), 64), torch.device("cpu"))[2]


def test_fixed_epochs_keeps_the_last_epoch_and_the_lr_baseline_shares_the_folds(ray_local, bags, tmp_path):
    features, labels = bags
    epochs = 4
    # patience 1 and min_epochs 0: early stopping could stop after epoch 2 and keep any epoch; fixed does not
    config = make_config(
        *FAST, "train.folds=2", f"train.epochs={epochs}", "train.selection=fixed_epochs",
        "train.min_epochs=0", "train.patience=1", "train.monitor=val_auc",
    )  # fmt: skip
    summary = run_training("mil", "fixed", str(tmp_path), features, labels, config)
    run = tmp_path / "runs" / "fixed"
    for fold in (0, 1):
        result = _result(run, f"mil-s0-f{fold}")
        assert [row["epoch"] for row in result["history"]] == list(range(epochs))
        assert result["metrics"]["best_epoch"] == epochs - 1
        assert result["metrics"]["epochs_run"] == epochs
        val_losses = [row["val_loss"] for row in result["history"]]
        kept = _val_loss(run / "jobs" / f"mil-s0-f{fold}" / "weights.pt", features, labels, fold)
        assert kept == pytest.approx(val_losses[-1], abs=1e-6), "the kept weights are the last epoch's"
        assert min(abs(v - val_losses[-1]) for v in val_losses[:-1]) > 1e-4, "epochs must be distinguishable"

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == summary.metrics
    lr = metrics["pooled_lr"]
    predictions = pd.read_parquet(run / "predictions.parquet")
    assert [(r["seed"], r["fold"]) for r in lr["folds"]] == [(0, 0), (0, 1)]
    for row in lr["folds"]:  # the baseline is tested on exactly the model's test slides, fold by fold
        assert sorted(row["test_ids"]) == sorted(predictions[predictions.fold == row["fold"]].slide_id)
        assert 0.0 <= row["auc"] <= 1.0 and 0.0 <= row["acc"] <= 1.0
    for key in ("auc", "acc", "f1"):
        assert lr["mean"][key] == pytest.approx(np.mean([r[key] for r in lr["folds"]]))
    table = format_table(metrics)
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["abmil"] * 2 + ["lr"] * 2 + [
        "abmil",
        "lr",
    ]
    assert f"{lr['mean']['auc']:.3f}±{lr['std']['auc']:.3f}" in table

    # A rerun (a resume of the finished run) reports the same baseline.
    again = run_training("mil", "fixed", str(tmp_path), features, labels, config)
    assert again.metrics["pooled_lr"] == lr


def _noise_bag(path: Path, n: int, dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    meta = BagMeta(encoder="synthetic", dim=dim, mpp=0.5, tile_px=256, code_version="test")
    feats = (5.0 * rng.normal(size=(n, dim))).astype(np.float32)
    write_bag(str(path), bag_table(np.arange(n), np.zeros(n), feats, meta, dtype="float32"))


def test_epoch_and_threshold_selection_never_look_at_the_test_part(ray_local, bags, tmp_path):
    features, labels = bags
    rows = [line.split(",")[:2] for line in Path(labels).read_text().split()[1:]]
    parts = ["train"] * 14 + ["val"] * 4 + ["test"] * 6  # one fixed split (labels alternate by slide)
    split_labels = with_split(labels, str(tmp_path / "split.csv"), parts)
    other = tmp_path / "other"  # the same bags, but every test bag replaced by loud noise
    other.mkdir()
    for (slide_id, _), part in zip(rows, parts, strict=True):
        target = other / f"{slide_id}.parquet"
        if part == "test":
            _noise_bag(target, 12, 16, seed=len(slide_id) + int(slide_id[-3:]))
        else:
            target.write_bytes((Path(features) / f"{slide_id}.parquet").read_bytes())
    config = make_config(*FAST, "train.epochs=6", "train.min_epochs=2", "train.patience=2")
    for name, source in (("clean", features), ("noisy", str(other))):
        run_training("mil", name, str(tmp_path), source, split_labels, config)
    clean, noisy = (_result(tmp_path / "runs" / n, "mil-s0-f0") for n in ("clean", "noisy"))
    drop = ("epoch_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in clean["history"]] == [
        {k: v for k, v in r.items() if k not in drop} for r in noisy["history"]
    ]
    for key in ("best_epoch", "epochs_run", "threshold"):
        assert clean["metrics"][key] == noisy["metrics"][key], key
    weights = [torch.load(tmp_path / "runs" / n / "jobs/mil-s0-f0/weights.pt") for n in ("clean", "noisy")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
