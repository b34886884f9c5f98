"""Slide-level classification metrics, the validation-chosen decision threshold, and fold summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score, roc_curve

__all__ = ["choose_threshold", "classification_metrics", "summarise"]


def choose_threshold(
    targets: Sequence[int] | np.ndarray, positive_prob: Sequence[float] | np.ndarray
) -> float:
    """The positive-class threshold maximising Youden's J (TPR − FPR) on validation predictions.

    Every cut between the lowest score called positive and the next lower score gives the same J; the
    middle of that gap is taken. Cutting at its edge (the lowest validation positive) would call a test
    slide negative for scoring a little below the validation positives, which, on a small and cleanly
    separated validation split, turns AUC 1.0 into accuracy 0.5.
    """
    y = np.asarray(targets)
    p = np.asarray(positive_prob, dtype=float)
    if len(set(y.tolist())) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    lowest_positive = min(1.0, thresholds[best])  # roc_curve's first threshold is +inf
    highest_negative = thresholds[best + 1] if best + 1 < len(thresholds) else 0.0
    return float((lowest_positive + highest_negative) / 2)


def classification_metrics(
    targets: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    threshold: float | None = None,
) -> dict[str, float]:
    """AUC, accuracy and F1. Binary: at `threshold` (validation-chosen) and at 0.5; multi-class: macro
    averages (one-vs-rest AUC, argmax predictions) plus per-class AUC and F1."""
    y = np.asarray(targets)
    probs = np.asarray(probs, dtype=float)
    n_classes = len(classes)
    out: dict[str, float] = {}
    if n_classes == 2:
        pos = probs[:, 1]
        out["auc"] = _safe_auc(y, pos)
        t = 0.5 if threshold is None else threshold
        for suffix, cut in (("", t), ("_at_0.5", 0.5)):
            pred = (pos >= cut).astype(int)
            out[f"acc{suffix}"] = float(accuracy_score(y, pred))
            out[f"f1{suffix}"] = float(f1_score(y, pred, zero_division=0))
        out["threshold"] = float(t)
        return out
    pred = probs.argmax(axis=1)
    try:
        labels = list(range(n_classes))
        out["auc"] = float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=labels))
    except ValueError:
        out["auc"] = math.nan
    out["acc"] = float(accuracy_score(y, pred))
    out["f1"] = float(f1_score(y, pred, average="macro", labels=list(range(n_classes)), zero_division=0))
    per_class_f1 = f1_score(y, pred, average=None, labels=list(range(n_classes)), zero_division=0)
    for c, name in enumerate(classes):
        out[f"auc_{name}"] = _safe_auc((y == c).astype(int), probs[:, c])
        out[f"f1_{name}"] = float(per_class_f1[c])
    return out


def _safe_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC, or NaN when only one class is present (no ranking to judge)."""
    if len(set(y.tolist())) < 2:
        return math.nan
    return float(roc_auc_score(y, score))


def summarise(rows: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and standard deviation (ddof=0) of every numeric key shared by all rows (NaN ignored)."""
    if not rows:
        return {}, {}
    keys = [k for k in rows[0] if all(isinstance(r.get(k), int | float) for r in rows)]
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    for key in keys:
        values = np.asarray([float(r[key]) for r in rows])
        values = values[np.isfinite(values)]
        mean[key] = float(values.mean()) if len(values) else math.nan
        std[key] = float(values.std()) if len(values) else math.nan
    return mean, std
