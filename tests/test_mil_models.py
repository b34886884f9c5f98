"""Every MIL model trains through the real runner (in-process Ray Train), binary and multi-class."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from slidestream.testing.bags import write_bags
from slidestream.testing.helpers import make_config
from slidestream.trainers.mil.predict import predict_run
from slidestream.trainers.mil.runner import run_training
from slidestream.trainers.models import MODELS


@pytest.fixture(scope="module")
def three_class_bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("bags3")
    labels = write_bags(str(root), n_slides=18, dim=16, n_instances=(8, 24), seed=5, classes=("a", "b", "c"))
    return str(root / "features"), labels


@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_model_trains_multiclass_and_predicts(ray_local, three_class_bags, tmp_path, model):
    features, labels = three_class_bags
    config = make_config(
        f"train.model={model}", "train.folds=2", "train.epochs=2", "train.min_epochs=1", "train.workers=0"
    )
    out = str(tmp_path)
    summary = run_training("mil", f"r-{model}", out, features, labels, config)

    metrics = summary.metrics
    assert metrics["classes"] == ["a", "b", "c"]
    for name in ("auc", "acc", "f1", "auc_a", "auc_b", "auc_c", "f1_a", "f1_b", "f1_c"):
        assert name in metrics["mean"] and name in metrics["std"], name
        assert all(0.0 <= row[name] <= 1.0 for row in metrics["folds"]), name
    assert json.loads((tmp_path / "runs" / f"r-{model}" / "metrics.json").read_text()) == metrics

    table = pq.read_table(tmp_path / "runs" / f"r-{model}" / "predictions.parquet").to_pandas()
    assert sorted(table.slide_id) == [f"slide-{i:03d}" for i in range(18)]  # every slide tested once
    probs = table[["prob_a", "prob_b", "prob_c"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(table.prediction) <= {"a", "b", "c"}

    report = predict_run(f"{out}/runs/r-{model}", features)
    predicted = pq.read_table(report.predictions).to_pandas()
    assert len(predicted) == 18 and np.allclose(predicted[["prob_a", "prob_b", "prob_c"]].sum(axis=1), 1.0)
