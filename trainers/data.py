"""Labelled feature bags for training: class encoding, patient groups and a bounded in-memory bag cache."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from slidestream.cluster.errors import SlidestreamError
from slidestream.pipelines.features import Bag, FeatureBagError, FeatureBags

__all__ = ["BagCache", "LabelledBags", "TrainDataError"]

_CHECK_THREADS = 8
_PROBLEMS_SHOWN = 5


class TrainDataError(SlidestreamError, ValueError):
    """Training inputs that cannot be used (labels, classes, folds); the message names slide and file."""


def _sorted_labels(values: set[str]) -> list[str]:
    """Labels in natural order: numerically when every label is a number ("0" < "1" < "10")."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


@dataclass(frozen=True)
class LabelledBags:
    """The slides of a feature directory that have labels: ids, class indices, patients, optional folds."""

    features: str
    labels: str
    slide_ids: list[str]
    targets: list[int]  # class index per slide, aligned with slide_ids
    classes: list[str]
    patients: list[str]  # patient id per slide (the slide id itself when the file has none)
    folds: list[str] | None  # the labels file's `fold` column, when present
    splits: list[str] | None  # the labels file's `split` column (train / val / test), when present
    dim: int

    @classmethod
    def open(cls, features: str, labels: str, classes: list[str] | None = None) -> LabelledBags:
        """Join a bag directory with a labels file; every labelled slide needs a bag (else an error), and
        every bag must be readable, non-empty and finite (checked here, before a run writes anything)."""
        bags = FeatureBags(features, labels)
        table = bags.label_table()
        slide_ids = [str(s) for s in table.column("slide_id").to_pylist()]
        if not slide_ids:
            raise TrainDataError(f"no slide in {labels} has a feature bag in {features}")
        raw = [str(v).strip() for v in table.column("label").to_pylist()]
        found = _sorted_labels(set(raw))
        if classes is None:
            classes = found
        elif unknown := sorted(set(raw) - set(classes)):
            raise TrainDataError(
                f"labels file {labels} has label(s) {unknown} not in train.classes {classes}"
            )
        if len(classes) < 2:
            raise TrainDataError(
                f"labels file {labels} has a single class {classes}; training needs two or more"
            )
        index = {name: i for i, name in enumerate(classes)}

        def column(name: str) -> list[str] | None:
            if name not in table.column_names:
                return None
            values = table.column(name).to_pylist()
            for slide_id, value in zip(slide_ids, values, strict=True):
                if value is None or str(value).strip() == "":
                    raise TrainDataError(f"labels file {labels}: slide {slide_id} has an empty {name!r}")
            return [str(v).strip() for v in values]

        patients = column("patient_id") or list(slide_ids)
        _check_bags(bags, slide_ids)
        return cls(
            features=features,
            labels=labels,
            slide_ids=slide_ids,
            targets=[index[v] for v in raw],
            classes=list(classes),
            patients=patients,
            folds=column("fold"),
            splits=column("split"),
            dim=bags.dim,
        )

    def target_of(self) -> dict[str, int]:
        return dict(zip(self.slide_ids, self.targets, strict=True))


def _check_bags(bags: FeatureBags, slide_ids: list[str]) -> None:
    """Read every bag once (a few at a time): an empty, non-finite or unreadable bag is refused up front
    instead of failing, after the run's files are written, every fold that meets it."""

    def problem(slide_id: str) -> str | None:
        try:
            bags.load(slide_id)  # checks rows, nulls, D and NaN/inf
        except FeatureBagError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max(1, min(_CHECK_THREADS, len(slide_ids)))) as pool:
        problems = [p for p in pool.map(problem, slide_ids) if p is not None]
    if problems:
        more = len(problems) - _PROBLEMS_SHOWN
        raise TrainDataError(
            f"{len(problems)} feature bag(s) in {bags.root} cannot be trained: "
            + "; ".join(problems[:_PROBLEMS_SHOWN])
            + (f"; … and {more} more" if more > 0 else "")
        )


class BagCache:
    """Loads bags through a FeatureBags reader and keeps recently used ones in memory, up to a byte budget.

    Each training worker owns one; repeated epochs then read each bag from storage once when it fits.
    """

    def __init__(self, bags: FeatureBags, budget_mb: int) -> None:
        self.bags = bags
        self.budget = budget_mb * 1024 * 1024
        self._cache: OrderedDict[str, Bag] = OrderedDict()
        self._bytes = 0

    def get(self, slide_id: str) -> Bag:
        if slide_id in self._cache:
            self._cache.move_to_end(slide_id)
            return self._cache[slide_id]
        bag = self.bags.load(slide_id)
        size = bag.features.numel() * bag.features.element_size()
        if size <= self.budget:
            self._cache[slide_id] = bag
            self._bytes += size
            while self._bytes > self.budget:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.features.numel() * old.features.element_size()
        return bag

    def features(self, slide_id: str, device: torch.device) -> torch.Tensor:
        return self.get(slide_id).features.to(device, non_blocking=True)
