"""Linear probing of slide embeddings (Giga-SSL's evaluation): logistic regression (C = 10, balanced
class weights, max_iter 1000), by default on embeddings standardised with the training part's mean and
std per dimension (`scale="standard"`); `scale="none"` probes the raw embeddings as the official
evaluation does. Raw, the fixed C regularises a representation by its scale: L2-normalised embeddings
whose slides differ by little around a shared direction are over-regularised, so the raw probe ranks
representations by their spread as much as by what they carry (bench/RESULTS.md, issue 23). ROC-AUC over
repeated stratified train/test splits that keep each patient on one side when the labels give a
`patient_id`, with the full training part and with small training sets (e.g. 20, 50 slides); the same
protocol on mean-pooled tile features is the baseline. Writes `probe.json` and an embedding map (PCA,
coloured by label)."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit, train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from slidestream.cluster.errors import UsageError
from slidestream.cluster.storage import join, read_bytes, write_bytes_atomic
from slidestream.pipelines.features import FeatureBags
from slidestream.pipelines.labels import read_labels
from slidestream.trainers.data import TrainDataError
from slidestream.trainers.gigassl.probe_scale import SCALES
from slidestream.trainers.metrics import classification_metrics

__all__ = [
    "ProbeReport",
    "format_probe",
    "mean_pooled",
    "probe",
    "probe_auc",
    "probe_splits",
    "read_embeddings",
    "run_probe",
]

C, MAX_ITER = 10.0, 1000


def read_embeddings(uri: str) -> tuple[list[str], np.ndarray]:
    """slide ids and the (N, D) embeddings of an embeddings Parquet file (`slide_id`, `embedding`)."""
    try:
        table = pq.read_table(io.BytesIO(read_bytes(uri)))
    except (OSError, pa.ArrowException) as exc:
        raise TrainDataError(f"cannot read embeddings {uri}: {exc}") from None
    for column in ("slide_id", "embedding"):
        if column not in table.column_names:
            raise TrainDataError(f"embeddings {uri}: missing column {column!r} (has {table.column_names})")
    values = table.column("embedding").to_pylist()
    if not values or len({len(v) for v in values}) != 1:
        raise TrainDataError(f"embeddings {uri}: column 'embedding' is empty or has rows of unequal length")
    matrix = np.asarray(values, dtype=np.float64)
    if not np.isfinite(matrix).all():
        raise TrainDataError(f"embeddings {uri}: column 'embedding' has NaN/inf values")
    return [str(s) for s in table.column("slide_id").to_pylist()], matrix


def _classifier(scale: str) -> LogisticRegression | Pipeline:
    if scale not in SCALES:
        raise UsageError(f"probe scale {scale!r}: choose one of {', '.join(SCALES)}")
    regression = LogisticRegression(C=C, class_weight="balanced", max_iter=MAX_ITER)
    return make_pipeline(StandardScaler(), regression) if scale == "standard" else regression


def probe_auc(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, classes: list[str],
    scale: str = "standard",
) -> float:  # fmt: skip
    """ROC-AUC on the test part of the probe fitted on the training part (class indices in y); a scaler is
    fitted on the training part only."""
    model = _classifier(scale).fit(x_train, y_train)
    return classification_metrics(y_test, model.predict_proba(x_test), classes)["auc"]


def probe_splits(
    y: np.ndarray, groups: np.ndarray | None, repeats: int, test_frac: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`repeats` stratified (train, test) index splits with about `test_frac` of the slides in test. With
    `groups` (patient per slide) every patient's slides fall on one side: the first fold of a shuffled
    stratified group k-fold, k = round(1 / test_frac), reshuffled per repeat."""
    rows = np.zeros((len(y), 1))
    if groups is None:
        splitter = StratifiedShuffleSplit(n_splits=repeats, test_size=test_frac, random_state=seed)
        return list(splitter.split(rows, y))
    k = max(2, round(1 / test_frac))
    if len(set(groups.tolist())) < k:
        raise TrainDataError(f"probing by patient with test_frac {test_frac} needs at least {k} patients, "
                             f"the labels give {len(set(groups.tolist()))}")  # fmt: skip
    return [next(StratifiedGroupKFold(k, shuffle=True, random_state=seed + r).split(rows, y, groups))
            for r in range(repeats)]  # fmt: skip


def probe(
    x: np.ndarray, y: np.ndarray, classes: list[str], sizes: list[int], repeats: int, test_frac: float,
    seed: int, groups: np.ndarray | None = None, scale: str = "standard",
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """ROC-AUC (mean, std over `repeats` stratified splits, patient-level with `groups`) per training-set
    size: "full" (the whole training part) and each size smaller than it (a stratified subsample of the
    training part)."""
    aucs: dict[str, list[float]] = {}
    n_train: dict[str, int] = {}
    for r, (train, test) in enumerate(probe_splits(y, groups, repeats, test_frac, seed)):
        plans = {"full": train}
        for size in sizes:
            if len(classes) <= size < len(train):
                plans[str(size)], _ = train_test_split(train, train_size=size, stratify=y[train],
                                                       random_state=seed * 1000 + r)  # fmt: skip
        for name, part in plans.items():
            aucs.setdefault(name, []).append(probe_auc(x[part], y[part], x[test], y[test], classes, scale))
            n_train[name] = len(part)
    return {
        name: {"n_train": n_train[name], "auc_mean": float(np.nanmean(v)), "auc_std": float(np.nanstd(v)),
               "repeats": len(v)}
        for name, v in aucs.items()
    }  # fmt: skip


def mean_pooled(features: str, slide_ids: list[str]) -> np.ndarray:
    """The mean tile feature of each slide's bag (the baseline slide representation)."""
    bags = FeatureBags(features, require_labels=False)
    missing = [s for s in slide_ids if s not in bags]
    if missing:
        raise TrainDataError(f"baseline features {features} have no bag for {len(missing)} slide(s): "
                             f"{', '.join(missing[:10])}")  # fmt: skip
    return np.stack([bags.load(s).features.double().mean(0).numpy() for s in slide_ids])


def _labels(uri: str, slide_ids: list[str]) -> tuple[list[str], list[str], np.ndarray | None]:
    """(slides with both an embedding and a label, their labels, their patients when the file has a
    `patient_id` column; a slide without one is its own patient)."""
    table = read_labels(uri)
    ids = table.column("slide_id").to_pylist()
    by_id = dict(zip(ids, table.column("label").to_pylist(), strict=True))
    kept = [s for s in slide_ids if s in by_id]
    if len(kept) < 4:
        raise TrainDataError(f"only {len(kept)} embedded slides have a label in {uri}; probing needs ≥ 4")
    patients = None
    if "patient_id" in table.column_names:
        patient_of = dict(zip(ids, table.column("patient_id").to_pylist(), strict=True))
        patients = np.array([str(patient_of[s] or s) for s in kept])
    return kept, [str(by_id[s]) for s in kept], patients


@dataclass
class ProbeReport:
    results: dict[str, dict[str, dict[str, Any]]]  # representation → size → auc stats
    classes: list[str]
    n_slides: int
    by_patient: bool  # splits kept each patient on one side (the labels gave patient_id)
    report: str  # probe.json
    picture: str  # embedding map PNG


def run_probe(
    embeddings: str, labels: str, baseline: str | None = None, sizes: tuple[int, ...] = (20, 50),
    repeats: int = 20, test_frac: float = 0.3, seed: int = 0, output: str | None = None,
    scale: str = "standard",
) -> ProbeReport:  # fmt: skip
    """Probe the embeddings (and mean-pooled `baseline` features); results next to the embeddings file
    unless `output` (a directory) is given."""
    from slidestream.trainers.viz import embedding_map

    ids, matrix = read_embeddings(embeddings)
    kept, names, patients = _labels(labels, ids)
    classes = sorted(set(names))
    counts = [names.count(c) for c in classes]
    if len(classes) < 2 or min(counts) < 2:
        raise TrainDataError(f"labels {labels}: probing needs ≥ 2 classes with ≥ 2 slides each "
                             f"(have {dict(zip(classes, counts, strict=True))})")  # fmt: skip
    y = np.array([classes.index(n) for n in names])
    rows = [ids.index(s) for s in kept]
    points = {"gigassl": matrix[rows]}
    if baseline:
        points["mean-pooled features"] = mean_pooled(baseline, kept)
    results = {name: probe(x, y, classes, list(sizes), repeats, test_frac, seed, patients, scale)
               for name, x in points.items()}  # fmt: skip
    where = output or embeddings.rsplit("/", 1)[0]
    report = join(where, "probe.json")
    payload = {"embeddings": embeddings, "labels": labels, "baseline": baseline, "classes": classes,
               "n_slides": len(kept), "repeats": repeats, "test_frac": test_frac, "C": C, "scale": scale,
               "by_patient": patients is not None, "results": results}  # fmt: skip
    write_bytes_atomic(report, json.dumps(payload, indent=1).encode())
    picture = join(where, "embedding_map.png")
    embedding_map(points, names, picture)
    return ProbeReport(results, classes, len(kept), patients is not None, report, picture)


def format_probe(report: ProbeReport) -> str:
    """A table: one row per representation, one column per training-set size (AUC mean ± std)."""
    found = {k for r in report.results.values() for k in r}
    sizes = ["full", *sorted((k for k in found if k != "full"), key=int)]
    head = f"{'representation':<22} " + " ".join(f"{'n=' + k:>16}" for k in sizes)
    lines = [head]
    for name, by_size in report.results.items():
        cells = []
        for k in sizes:
            stats = by_size.get(k)
            text = "-" if stats is None or math.isnan(stats["auc_mean"]) else (
                f"{stats['auc_mean']:.3f}±{stats['auc_std']:.3f}")  # fmt: skip
            cells.append(f"{text:>16}")
        lines.append(f"{name:<22} " + " ".join(cells))
    return "\n".join(lines)
