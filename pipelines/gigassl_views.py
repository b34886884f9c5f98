"""Giga-SSL offline views: per slide, NAUG augmentations, each ONE parameter draw applied to all NT tiles
it covers (drawn with replacement), so a view is a consistently augmented sample of the slide.

The official Giga-SSL code's recipe: random resized crop (scale 0.5–1), colour jitter (0.4, 0.4, 0.4,
0.2) with p 0.8, grayscale p 0.2, Gaussian blur 5×5 with σ ∈ [0.1, 1] and p 0.5.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

_CROP_SCALE = (0.5, 1.0)
_CROP_RATIO = (3 / 4, 4 / 3)
_JITTER = (0.4, 0.4, 0.4, 0.2)  # brightness, contrast, saturation, hue
_P_JITTER, _P_GRAY, _P_BLUR = 0.8, 0.2, 0.5
_BLUR_KERNEL, _BLUR_SIGMA = 5, (0.1, 1.0)


@dataclass(frozen=True)
class ViewParams:
    crop: tuple[float, float, float, float]  # top, left, height, width as fractions of the tile side
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation factors; hue shift
    jitter_order: tuple[int, ...]
    grayscale: bool
    blur_sigma: float | None


def slide_rng(seed: int, slide_id: str) -> np.random.Generator:
    """A generator that depends only on the seed and the slide (stable across runs and workers)."""
    return np.random.default_rng([seed, zlib.crc32(slide_id.encode())])


def _draw_crop(rng: np.random.Generator) -> tuple[float, float, float, float]:
    for _ in range(10):
        area = rng.uniform(*_CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])))
        width, height = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if width <= 1 and height <= 1:
            return (rng.uniform(0, 1 - height), rng.uniform(0, 1 - width), height, width)
    return (0.0, 0.0, 1.0, 1.0)


def draw_params(rng: np.random.Generator) -> ViewParams:
    crop = _draw_crop(rng)
    jitter = None
    if rng.random() < _P_JITTER:
        b, c, s, h = _JITTER
        jitter = (
            rng.uniform(1 - b, 1 + b),
            rng.uniform(1 - c, 1 + c),
            rng.uniform(1 - s, 1 + s),
            rng.uniform(-h, h),
        )
    order = tuple(int(i) for i in rng.permutation(4))
    grayscale = bool(rng.random() < _P_GRAY)
    blur = float(rng.uniform(*_BLUR_SIGMA)) if rng.random() < _P_BLUR else None
    return ViewParams(crop, jitter, order, grayscale, blur)


def apply_view(tiles: np.ndarray, params: ViewParams, out_px: int) -> np.ndarray:
    """The same augmentation on every tile: uint8 (N, H, W, 3) → uint8 (N, out_px, out_px, 3)."""
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
    side = x.shape[-1]
    top, left, height, width = params.crop
    x = TF.resized_crop(
        x,
        round(top * side),
        round(left * side),
        max(1, round(height * side)),
        max(1, round(width * side)),
        [out_px, out_px],
        antialias=True,
    )
    if params.jitter is not None:
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for index in params.jitter_order:
            x = adjust[index](x, params.jitter[index])
    if params.grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur_sigma is not None:
        x = TF.gaussian_blur(x, [_BLUR_KERNEL, _BLUR_KERNEL], [params.blur_sigma, params.blur_sigma])
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def sample_views(n_tiles: int, naug: int, nt: int, rng: np.random.Generator) -> list[np.ndarray]:
    """For each augmentation, the indices of its NT tiles, drawn with replacement."""
    return [rng.integers(0, n_tiles, size=nt) for _ in range(naug)]
