"""MIL aggregator models (instance embedding + pooling + linear head) and a registry by name.

The registry is the one list of the MIL model names (the command line's choices come from it); importing
this package costs no torch: a model's module is imported when it is built."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slidestream.trainers.models.base import MILModel

__all__ = ["MODELS", "build_model"]

# name → (module, class). Imported on demand so that one model's import cost is paid only when used.
MODELS: dict[str, tuple[str, str]] = {
    "abmil": ("slidestream.trainers.models.abmil", "ABMIL"),
    "transmil": ("slidestream.trainers.models.transmil", "TransMIL"),
    "dsmil": ("slidestream.trainers.models.dsmil", "DSMIL"),
    "clam_sb": ("slidestream.trainers.models.clam", "CLAMSB"),
    "dtfd": ("slidestream.trainers.models.dtfd", "DTFDMIL"),
    "maxpool": ("slidestream.trainers.models.maxpool", "MaxPoolMIL"),
}


def build_model(name: str, in_dim: int, n_classes: int, **options: Any) -> MILModel:
    """A fresh model by registry name, for ``in_dim``-d features and ``n_classes`` classes."""
    if name not in MODELS:
        raise ValueError(f"unknown MIL model {name!r}; choose one of {', '.join(MODELS)}")
    module_name, class_name = MODELS[name]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(in_dim, n_classes, **options)
