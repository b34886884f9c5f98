"""The training methods in one table: the kinds `slidestream train` and `slidestream tune` offer, the
config section that holds each method's settings (where its --workers / --epochs go), what it is (the
command line's help), and for the kinds that can be swept, the sweep target that compares their trials.

The command line and Tune read this table; nothing else lists the kinds. It imports nothing heavy: a
sweep target's module is imported when a sweep starts.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    kind: str
    section: str  # the config section of its settings
    summary: str  # what `train KIND` does
    tune_target: str | None = None  # "module:class" of its sweep target; None: it cannot be swept
    tune_summary: str = ""  # what its trials are compared on

    def target_class(self) -> Any:
        """The sweep target class (imported here, on first use)."""
        if self.tune_target is None:
            raise KeyError(f"{self.kind} has no sweep target")
        module, name = self.tune_target.split(":")
        return getattr(importlib.import_module(module), name)


_TARGETS = "slidestream.trainers.tune.targets"
METHODS: dict[str, Method] = {
    m.kind: m
    for m in (
        Method(
            "mil", "train", "baseline MIL", f"{_TARGETS}:MILTarget", "validation loss or AUC of a fold split"
        ),
        Method(
            "mhim", "train", "MHIM-MIL", f"{_TARGETS}:MILTarget", "validation loss or AUC of a fold split"
        ),
        Method("icmil", "train", "bag classifier and tile embedder in turns"),
        Method(
            "cdma",
            "cdma",
            "semi-supervised tissue segmentation on the tile shards",
            f"{_TARGETS}:CDMATarget",
            "validation-slide Dice",
        ),
        Method(
            "gigassl",
            "gigassl",
            "self-supervised slide embeddings from Giga-SSL views (--features: the views, default the only "
            "set under OUT/gigassl)",
            f"{_TARGETS}:GigaSSLTarget",
            "validation AUC of a linear probe of the slide embeddings after every epoch",
        ),
    )
}
TUNABLE = [kind for kind, method in METHODS.items() if method.tune_target is not None]
