"""Tissue detection on a low-resolution rendering of the slide: HSV saturation, Otsu, morphology."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk, opening, remove_small_objects

from slidestream.cluster.config import TissueConfig
from slidestream.pipelines.formats.handle import SlideHandle

# Hues of green and blue marker ink (HSV hue in [0, 1]); H&E stains sit in the pink-to-purple range.
_PEN_HUE_RANGE = (0.15, 0.70)
_STRIP_PX = 512  # rows read per step when a level has to be shrunk to the mask resolution


@dataclass
class TissueMask:
    mask: np.ndarray  # bool (h, w)
    downsample: float  # level-0 pixels per mask pixel
    rgb: np.ndarray | None = None  # uint8 (h, w, 3): the thumbnail it was found on (kept for the QC picture)

    def fractions(self, xs: np.ndarray, ys: np.ndarray, side0: float) -> np.ndarray:
        """Fraction of tissue inside each level-0 square (x, y, side0), from an integral image."""
        integral = np.pad(self.mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        h, w = self.mask.shape
        x0 = np.clip(np.floor(xs / self.downsample).astype(int), 0, w)
        y0 = np.clip(np.floor(ys / self.downsample).astype(int), 0, h)
        x1 = np.clip(np.ceil((xs + side0) / self.downsample).astype(int), 0, w)
        y1 = np.clip(np.ceil((ys + side0) / self.downsample).astype(int), 0, h)
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        return total / area


def low_resolution_rgb(slide: SlideHandle, mpp0: float, mask_mpp: float) -> tuple[np.ndarray, float]:
    """The slide rendered at about `mask_mpp` µm/px, read strip by strip from the best pyramid level.

    Returns the RGB array and its downsample relative to level 0.
    """
    target = max(mask_mpp / mpp0, 1.0)
    downsamples = list(slide.level_downsamples)
    level = max((i for i, d in enumerate(downsamples) if d <= target * 1.001), key=lambda i: downsamples[i])
    level_w, level_h = slide.level_dimensions[level]
    scale = downsamples[level] / target
    out_w = max(1, round(level_w * scale))
    if scale > 0.999:
        region = slide.read_region((0, 0), level, (level_w, level_h))
        return region, downsamples[level]
    strips = []
    rows_done = 0
    for top in range(0, level_h, _STRIP_PX):
        rows = min(_STRIP_PX, level_h - top)
        region = slide.read_region((0, round(top * downsamples[level])), level, (level_w, rows))
        strip_h = round((top + rows) * scale) - rows_done
        if strip_h > 0:
            strips.append(np.asarray(Image.fromarray(region).resize((out_w, strip_h), Image.Resampling.BOX)))
            rows_done += strip_h
    return np.concatenate(strips, axis=0), level_w * downsamples[level] / out_w


def detect_tissue(rgb: np.ndarray, mask_mpp: float, cfg: TissueConfig) -> np.ndarray:
    """Boolean tissue mask of an RGB image at `mask_mpp` µm/px."""
    hsv = rgb2hsv(rgb)
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    threshold = cfg.min_saturation
    if saturation.max() - saturation.min() > 1e-3:
        threshold = max(threshold, float(threshold_otsu(saturation)) * cfg.otsu_scale)
    mask = (saturation > threshold) & (value > cfg.max_value_black)
    if cfg.exclude_pen:
        mask &= ~((hue > _PEN_HUE_RANGE[0]) & (hue < _PEN_HUE_RANGE[1]))
    px_per_um = 1.0 / mask_mpp
    if cfg.closing_um > 0:
        mask = closing(mask, disk(max(1, round(cfg.closing_um * px_per_um))))
    if cfg.opening_um > 0:
        mask = opening(mask, disk(max(1, round(cfg.opening_um * px_per_um))))
    if cfg.min_object_um2 > 0:
        mask = remove_small_objects(mask, max_size=max(1, round(cfg.min_object_um2 * px_per_um**2)))
    if cfg.fill_holes_um2 > 0:
        mask = _fill_small_holes(mask, max(1, round(cfg.fill_holes_um2 * px_per_um**2)))
    return mask


def _fill_small_holes(mask: np.ndarray, max_px: int) -> np.ndarray:
    """Fill enclosed background regions up to `max_px`; glass touching the image border is never a hole."""
    holes, count = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if count == 0:
        return mask
    sizes = np.bincount(holes.ravel())
    small = sizes <= max_px
    small[0] = False
    return mask | small[holes]


def tissue_mask(slide: SlideHandle, mpp0: float, cfg: TissueConfig) -> TissueMask:
    rgb, downsample = low_resolution_rgb(slide, mpp0, cfg.mask_mpp)
    return TissueMask(detect_tissue(rgb, downsample * mpp0, cfg), downsample, rgb)
