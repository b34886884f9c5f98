"""The reference every MIL run reports beside its own metrics: logistic regression on mean+max-pooled bags.

Each bag becomes one vector, the concatenation of the mean and the maximum of its raw instance features
over instances. Per fold split, a scaler and an L2 logistic regression (fixed `C`, no tuning: the
validation part of a small cohort is too small to choose it reliably) are fitted on the training part
only; the decision threshold is chosen on the validation part exactly as for the MIL model, and the test
part is scored. It runs in the driver (seconds: one pass over the bags, then one small fit per split) and
is deterministic, so a resumed run reports the same baseline. If attention pooling does not beat it on
the same folds, the MIL model is not earning its keep on that cohort.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from slidestream.pipelines.features import FeatureBags
from slidestream.trainers.data import LabelledBags
from slidestream.trainers.metrics import choose_threshold, classification_metrics, summarise
from slidestream.trainers.splits import FoldSplit

__all__ = ["POOLED_C", "fit_pooled_split", "pooled_baseline", "pooled_features"]

POOLED_C = 0.1  # inverse L2 strength on standardised features (bench/mil_protocol.py compares others)


def pooled_features(bags: FeatureBags, slide_ids: list[str]) -> dict[str, np.ndarray]:
    """Per slide: [mean over instances, max over instances] of its raw features (2·D values)."""
    pooled = {}
    for slide_id in slide_ids:
        x = bags.load(slide_id).features.double()
        pooled[slide_id] = np.concatenate([x.mean(0).numpy(), x.amax(0).numpy()])
    return pooled


def fit_pooled_split(
    split: FoldSplit, pooled: dict[str, np.ndarray], targets: dict[str, int], classes: list[str], c: float
) -> dict[str, Any]:
    """Fit on `split.train`, threshold on `split.val` (binary), metrics on `split.test`; the test ids scored
    are returned with them."""

    def part(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([pooled[s] for s in ids]), np.asarray([targets[s] for s in ids])

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = map(part, (split.train, split.val, split.test))
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(x_train), y_train)

    def probs(x: np.ndarray) -> np.ndarray:
        out = np.zeros((len(x), len(classes)))
        out[:, model.classes_] = model.predict_proba(scaler.transform(x))
        return out

    threshold = choose_threshold(y_val, probs(x_val)[:, 1]) if len(classes) == 2 else None
    metrics = classification_metrics(y_test, probs(x_test), classes, threshold)
    return {"seed": split.seed, "fold": split.fold, **metrics, "test_ids": list(split.test)}


def pooled_baseline(data: LabelledBags, splits: list[FoldSplit], c: float = POOLED_C) -> dict[str, Any]:
    """The baseline on every split: per-fold rows (with their test ids), mean and std of the metrics."""
    in_splits = sorted({s for split in splits for s in (*split.train, *split.val, *split.test)})
    pooled = pooled_features(FeatureBags(data.features), in_splits)
    targets = data.target_of()
    rows = [fit_pooled_split(split, pooled, targets, data.classes, c) for split in splits]
    mean, std = summarise([{k: v for k, v in r.items() if k not in ("seed", "fold")} for r in rows])
    return {"features": "mean+max", "C": c, "folds": rows, "mean": mean, "std": std}
