"""Segmentation metrics of one class on one image or slide: Dice, Jaccard, HD95 and ASD (distances in the
units of `spacing`, e.g. µm). Both masks empty: Dice = Jaccard = 1, distances 0; one of them empty: the
distances are undefined (NaN, left out of means by `slidestream.trainers.metrics.summarise`)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["segmentation_metrics"]


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))
    return mask & ~eroded


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing: float) -> np.ndarray:
    """Distance from every surface pixel of `a` to the nearest surface pixel of `b`."""
    to_b = ndimage.distance_transform_edt(~_surface(b), sampling=spacing)
    return to_b[_surface(a)]


def segmentation_metrics(pred: np.ndarray, truth: np.ndarray, spacing: float = 1.0) -> dict[str, float]:
    """`pred`, `truth`: boolean masks of one class. ASD is the mean distance from the predicted surface to
    the true one; HD95 the 95th percentile of the surface distances in both directions."""
    pred, truth = pred.astype(bool), truth.astype(bool)
    inter = float((pred & truth).sum())
    total = float(pred.sum() + truth.sum())
    union = float((pred | truth).sum())
    if total == 0:
        return {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    out = {"dice": 2 * inter / total, "jaccard": inter / union}
    if not pred.any() or not truth.any():
        return {**out, "hd95": math.nan, "asd": math.nan}
    forward = _surface_distances(pred, truth, spacing)
    backward = _surface_distances(truth, pred, spacing)
    out["hd95"] = float(np.percentile(np.concatenate([forward, backward]), 95))
    out["asd"] = float(forward.mean())
    return out
