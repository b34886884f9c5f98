"""The one place that imports spconv, with the CPU shim that makes its backward pass work without CUDA.

spconv 2.3.8's CPU wheel runs forward passes, but its backward asks `torch.cuda.current_stream()` for a
stream handle and fails on a machine without an NVIDIA driver. On such a machine the handle is unused by
the CPU kernels, so `spconv.pytorch.ops.get_current_stream` is replaced by one returning 0. With CUDA
present nothing is patched (GPU runs install the `spconv-cu12x` wheel; see README, "GPU extra").
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch

__all__ = ["cpu_shim_active", "spconv"]

log = logging.getLogger(__name__)
# cumm/spconv print their own banners at import; keep them quiet unless asked.
os.environ.setdefault("CUMM_DEBUG", "0")


def _cpu_stream() -> int:
    return 0


def _load() -> tuple[ModuleType, bool]:
    try:
        import spconv.pytorch as sp
        import spconv.pytorch.ops as ops
    except ImportError as exc:  # pragma: no cover - spconv is a declared dependency
        raise ImportError(
            "Giga-SSL needs spconv: pip install spconv==2.3.8 (CPU) or spconv-cu12x (GPU, see README)"
        ) from exc
    if torch.cuda.is_available():
        return sp, False
    ops.get_current_stream = _cpu_stream
    return sp, True


spconv, cpu_shim_active = _load()
