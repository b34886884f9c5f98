"""Giga-SSL's linear probe: logistic regression (C = 10, balanced, max_iter 1000) on standardised
embeddings, or on the raw ones as the official evaluation runs it (`scale="none"`), and test splits that
never put one patient on both sides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from slidestream.cluster.errors import UsageError
from slidestream.trainers.gigassl.probe import probe_auc, probe_splits, run_probe


def _cohort(root: Path, patients: int = 20, per_patient: int = 2) -> tuple[str, str]:
    """Slides of one patient share one random embedding; labels are random per patient (no signal): a
    probe scores well only when a patient's twin slide sits in the training part."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(patients, 64))
    labels = np.array(["a", "b"] * (patients // 2))
    rng.shuffle(labels)
    ids = [f"p{p}s{s}" for p in range(patients) for s in range(per_patient)]
    emb = np.repeat(points, per_patient, axis=0)
    pq.write_table(pa.table({"slide_id": ids, "embedding": emb.tolist()}), root / "emb.parquet")
    rows = "".join(f"{i},{labels[n // per_patient]},P{n // per_patient}\n" for n, i in enumerate(ids))
    (root / "labels.csv").write_text("slide_id,label,patient_id\n" + rows)
    return str(root / "emb.parquet"), str(root / "labels.csv")


def test_probe_never_splits_a_patient_across_train_and_test(tmp_path):
    embeddings, labels = _cohort(tmp_path)
    report = run_probe(embeddings, labels, sizes=(), repeats=20)
    # twins across the split let the probe memorise patients (slide-level splits)
    assert report.results["gigassl"]["full"]["auc_mean"] < 0.8, report.results  # 0.65 here, 0.97 before

    y = np.array([0, 1] * 10 + [0, 1] * 10)
    groups = np.repeat(np.arange(20), 2)
    for train, test in probe_splits(y, groups, repeats=10, test_frac=0.3, seed=0):
        assert not set(groups[train]) & set(groups[test])
        assert 0.2 <= len(test) / len(y) <= 0.45 and set(y[test]) == {0, 1}


def test_probe_is_logistic_regression_on_standardised_or_raw_embeddings():
    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 20)
    x = rng.normal(size=(40, 6)) * np.array([100.0, 0.01, 1, 1, 1, 1]) + 0.3 * y[:, None]
    train, test = np.arange(24), np.arange(24, 40)

    def auc(features: np.ndarray) -> float:
        model = LogisticRegression(C=10, class_weight="balanced", max_iter=1000)
        model.fit(features[train], y[train])
        return roc_auc_score(y[test], model.predict_proba(features[test])[:, 1])

    scaled = StandardScaler().fit(x[train]).transform(x)  # fitted on the training part only
    raw = auc(x)
    assert raw != auc(scaled)  # this data tells the two apart
    assert probe_auc(x[train], y[train], x[test], y[test], ["a", "b"], scale="none") == raw
    assert probe_auc(x[train], y[train], x[test], y[test], ["a", "b"]) == auc(scaled)
    with pytest.raises(UsageError, match="probe scale 'minmax'"):
        probe_auc(x[train], y[train], x[test], y[test], ["a", "b"], scale="minmax")


def test_standardising_keeps_a_label_that_unit_norm_embeddings_carry_in_a_small_spread(tmp_path):
    """L2-normalised embeddings sharing one dominant direction, with a few label-free dimensions of large
    spread (stain, site) and the label in a small one: at C = 10 the raw probe's weights follow the
    large dimensions' noise; standardised, the label's dimension counts as much as they do."""
    rng = np.random.default_rng(5)
    n = 40
    y = np.array(["a", "b"] * (n // 2))
    spread = np.full(64, 0.005)
    spread[2:6] = 0.1
    x = np.eye(64)[0] + spread * rng.normal(size=(n, 64)) + 0.02 * (y == "b")[:, None] * np.eye(64)[1]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"s{i}" for i in range(n)]
    pq.write_table(pa.table({"slide_id": ids, "embedding": x.tolist()}), tmp_path / "emb.parquet")
    rows = "".join(f"{i},{v}\n" for i, v in zip(ids, y, strict=True))
    (tmp_path / "labels.csv").write_text("slide_id,label\n" + rows)
    emb, labels = str(tmp_path / "emb.parquet"), str(tmp_path / "labels.csv")
    auc = {}
    for scale in ("standard", "none"):
        report = run_probe(emb, labels, sizes=(), repeats=10, scale=scale)
        auc[scale] = report.results["gigassl"]["full"]["auc_mean"]
    assert auc["standard"] >= 0.8 and auc["none"] < auc["standard"] - 0.2, auc  # 0.89 and 0.57 here
    assert json.loads((tmp_path / "probe.json").read_text())["scale"] == "none"
