"""Opening slides (local or object storage, any supported format) and reading tiles from them."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from slidestream.pipelines.formats.choose import Backend, open_handle
from slidestream.pipelines.formats.handle import SlideHandle
from slidestream.pipelines.slides import current_fingerprint
from slidestream.pipelines.tiling import ReadPlan


@dataclass(frozen=True)
class SlideInfo:
    width: int
    height: int
    mpp: float | None
    vendor: str | None
    level_downsamples: tuple[float, ...]
    backend: str


@functools.lru_cache(maxsize=4)
def open_slide(uri: str, fingerprint: str, backend: Backend | None = None) -> SlideHandle:
    """One handle per worker process per slide version; the fingerprint is checked before reuse.

    A slide replaced or truncated after discovery fails loudly instead of mixing two versions.
    """
    current = current_fingerprint(uri)
    if current != fingerprint:
        raise OSError(f"slide changed since discovery (fingerprint {fingerprint} → {current})")
    return open_handle(uri, backend)


def slide_info(slide: SlideHandle, mpp_override: float | None) -> SlideInfo:
    width, height = slide.dimensions
    return SlideInfo(
        width=width,
        height=height,
        mpp=float(mpp_override) if mpp_override else slide.mpp,
        vendor=slide.vendor,
        level_downsamples=slide.level_downsamples,
        backend=slide.backend,
    )


def _to_tile(region: np.ndarray, plan: ReadPlan) -> np.ndarray:
    """Shrink a region read at `plan.level` to `tile_px` (integer factors by exact box reduction)."""
    if plan.read_px == plan.tile_px:
        return region
    image = Image.fromarray(region)
    factor, remainder = divmod(plan.read_px, plan.tile_px)
    if remainder == 0:
        return np.asarray(image.reduce(factor))
    return np.asarray(image.resize((plan.tile_px, plan.tile_px), Image.Resampling.BOX))


def resize_tile(tile: np.ndarray, px: int) -> np.ndarray:
    """A tile resized to `px` (e.g. to an encoder's input size), antialiased."""
    return np.asarray(Image.fromarray(tile).resize((px, px), Image.Resampling.BILINEAR, reducing_gap=2.0))


def read_tile(slide: SlideHandle, x: int, y: int, plan: ReadPlan) -> np.ndarray:
    """One tile: RGB uint8 (tile_px, tile_px, 3) for level-0 square (x, y), read region by region."""
    region = slide.read_region((int(x), int(y)), plan.level, (plan.read_px, plan.read_px))
    return np.ascontiguousarray(_to_tile(region, plan))


def read_tiles(slide: SlideHandle, xs: list[int], ys: list[int], plan: ReadPlan) -> Iterator[np.ndarray]:
    """Tiles at level-0 corners (xs, ys), in order, read in batches where the backend can."""
    for region in slide.read_regions(xs, ys, plan.level, plan.read_px):
        yield np.ascontiguousarray(_to_tile(region, plan))
