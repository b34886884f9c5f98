"""Fold plans: stratified k-fold at patient level, with a validation part carved from each training part.

A slide's patient never straddles train / validation / test. A `fold` column in the labels file gives
the test folds; a `split` column (train / val / test) gives one fixed split. Every part must hold every
class, or the fold cannot be trained and judged: that is an error naming the fold and the part.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from slidestream.trainers.data import LabelledBags, TrainDataError

__all__ = ["FoldSplit", "carve_val", "make_splits"]

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class FoldSplit:
    """Slide ids of one fold's parts, for one seed."""

    seed: int
    fold: int
    train: list[str]
    val: list[str]
    test: list[str]

    @property
    def name(self) -> str:
        return f"s{self.seed}-f{self.fold}"

    def to_dict(self) -> dict:
        return asdict(self)


def _group_kfold(y: np.ndarray, groups: np.ndarray, k: int, seed: int, what: str) -> list[np.ndarray]:
    """Test-part indices of a stratified k-fold that keeps each patient in one part (exactly stratified
    when every patient has one slide); an error when there are too few patients."""
    n_groups = len(set(groups.tolist()))
    if n_groups < k:
        raise TrainDataError(f"{what}: {k} folds need at least {k} patients, have {n_groups}")
    if n_groups == len(groups):
        counts = np.bincount(y)
        smallest = int(counts[counts > 0].min())
        if smallest < k:
            raise TrainDataError(f"{what}: {k} folds need {k} slides of each class, one class has {smallest}")
        splitter = StratifiedKFold(k, shuffle=True, random_state=seed)
        return [test for _, test in splitter.split(np.zeros(len(y)), y)]
    group_splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in group_splitter.split(np.zeros(len(y)), y, groups)]


def carve_val(data: LabelledBags, train: np.ndarray, val_frac: float, seed: int, fold: int) -> np.ndarray:
    """A validation part of about `val_frac` of the training part: the first candidate holding every class
    (small data sets can leave a class out of some candidates)."""
    y = np.asarray(data.targets)[train]
    groups = np.asarray(data.patients)[train]
    counts = np.bincount(y)
    k = max(2, min(round(1.0 / val_frac), int(counts[counts > 0].min())))  # small sets: a larger val part
    candidates = _group_kfold(y, groups, k, seed, f"validation split of fold {fold}")
    n_classes = len(data.classes)
    for part in candidates:
        if len(set(y[part].tolist())) == n_classes:
            return train[part]
    return train[candidates[0]]  # `_check` names the missing class


def _check(data: LabelledBags, split: FoldSplit) -> None:
    target = data.target_of()
    for part in SPLIT_NAMES:
        ids = getattr(split, part)
        present = {target[s] for s in ids}
        if len(present) < len(data.classes):
            missing = [data.classes[c] for c in range(len(data.classes)) if c not in present]
            raise TrainDataError(
                f"fold {split.fold} (seed {split.seed}): the {part} part ({len(ids)} slides) has no slide "
                f"of class(es) {missing}; use fewer folds, more slides, or a labels file with folds"
            )


def make_splits(
    data: LabelledBags, folds: int, seeds: list[int], val_frac: float, protocol: str = "standard"
) -> list[FoldSplit]:
    """One FoldSplit per (seed, fold). `c16_reproduction` validates on the test fold, as the paper did."""
    ids = np.asarray(data.slide_ids)
    y = np.asarray(data.targets)
    groups = np.asarray(data.patients)
    plans: list[FoldSplit] = []
    for seed in seeds:
        if data.splits is not None:
            parts = np.asarray(data.splits)
            unknown = sorted(set(parts.tolist()) - set(SPLIT_NAMES))
            if unknown:
                raise TrainDataError(
                    f"labels file {data.labels}: split values must be train/val/test, got {unknown}"
                )
            tests = [np.flatnonzero(parts == "test")]
        elif data.folds is not None:
            fold_col = np.asarray(data.folds)
            tests = [np.flatnonzero(fold_col == f) for f in sorted(set(fold_col.tolist()))]
        else:
            tests = _group_kfold(y, groups, folds, seed, f"labels file {data.labels}")
        for fold, test in enumerate(tests):
            rest = np.setdiff1d(np.arange(len(ids)), test)
            if data.splits is not None and "val" in data.splits:
                val = np.flatnonzero(np.asarray(data.splits) == "val")
                rest = np.setdiff1d(rest, val)
            elif protocol == "c16_reproduction":
                val = test
            else:
                val = carve_val(data, rest, val_frac, seed, fold)
                rest = np.setdiff1d(rest, val)
            split = FoldSplit(seed, fold, ids[rest].tolist(), ids[val].tolist(), ids[test].tolist())
            _check(data, split)
            plans.append(split)
    return plans
