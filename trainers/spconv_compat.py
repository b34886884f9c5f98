"""The one place that imports spconv, with the CPU shim that makes its backward pass work without CUDA.

spconv 2.3.8's CPU wheel runs forward passes, but its backward asks `torch.cuda.current_stream()` for a
stream handle and fails on a machine without an NVIDIA driver. On such a machine the handle is unused by
the CPU kernels, so `spconv.pytorch.ops.get_current_stream` is replaced by one returning 0. With CUDA
present nothing is patched (GPU runs install the `spconv-cu12x` wheel; see README, "GPU extra").

Its CPU gather/scatter kernels also race when torch runs them on several threads: a 3×3 convolution
loses about one update in five runs on two cores (seen in CI). Every feature kernel therefore runs on one
thread when its input is on the CPU; the index-pair kernels are left as they are.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import wraps
from types import ModuleType

import torch

__all__ = ["cpu_shim_active", "spconv"]

log = logging.getLogger(__name__)
# cumm/spconv print their own banners at import; keep them quiet unless asked.
os.environ.setdefault("CUMM_DEBUG", "0")


# spconv.pytorch.ops functions that accumulate features; their first argument is the feature tensor.
_FEATURE_KERNELS = (
    "indice_conv",
    "fused_indice_conv",
    "indice_conv_backward",
    "implicit_gemm",
    "implicit_gemm_backward",
    "indice_maxpool",
    "indice_maxpool_backward",
)


def _cpu_stream() -> int:
    return 0


def _single_threaded_on_cpu(kernel: Callable) -> Callable:
    @wraps(kernel)
    def run(features: torch.Tensor, *args, **kwargs):
        if features.is_cuda:
            return kernel(features, *args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return kernel(features, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


def _load() -> tuple[ModuleType, bool]:
    try:
        import spconv.pytorch as sp
        import spconv.pytorch.ops as ops
    except ImportError as exc:  # pragma: no cover - spconv is a declared dependency
        raise ImportError(
            "Giga-SSL needs spconv: pip install spconv==2.3.8 (CPU) or spconv-cu12x (GPU, see README)"
        ) from exc
    for name in _FEATURE_KERNELS:
        setattr(ops, name, _single_threaded_on_cpu(getattr(ops, name)))
    if torch.cuda.is_available():
        return sp, False
    ops.get_current_stream = _cpu_stream
    return sp, True


spconv, cpu_shim_active = _load()
