"""Opening slides (local or object storage, range reads through fsspec) and reading tiles from them."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tiffslide import TiffSlide

from slidestream.cluster.storage import filesystem, is_local, scrub_secrets, storage_options
from slidestream.pipelines.regions import Rect, RegionReader, UnreadableRegion, level_page, on_white, supports
from slidestream.pipelines.slides import fingerprint_of
from slidestream.pipelines.tiling import ReadPlan


class SlideError(Exception):
    """A slide that cannot be processed. `permanent` errors are not retried until the file changes."""

    def __init__(self, reason: str, permanent: bool = True) -> None:
        super().__init__(reason)
        self.reason = scrub_secrets(reason)
        self.permanent = permanent


def classify(what: str, exc: BaseException) -> SlideError:
    """Storage/network errors are transient (retried on the next run); anything else is permanent."""
    if isinstance(exc, SlideError):
        return exc
    transient = isinstance(exc, OSError | ConnectionError | TimeoutError)
    return SlideError(f"{what}: {type(exc).__name__}: {exc}", permanent=not transient)


@dataclass(frozen=True)
class SlideInfo:
    width: int
    height: int
    mpp: float | None
    vendor: str | None
    level_downsamples: tuple[float, ...]


def open_slide_uncached(uri: str) -> TiffSlide:
    if is_local(uri):
        return TiffSlide(uri.removeprefix("file://"))
    return TiffSlide(uri, storage_options=storage_options(uri))


@functools.lru_cache(maxsize=4)
def open_slide(uri: str, fingerprint: str) -> TiffSlide:
    """One handle per worker process per slide version; the fingerprint is checked before reuse.

    A slide replaced or truncated after discovery fails loudly instead of mixing two versions.
    """
    fs, path = filesystem(uri)
    current = fingerprint_of(fs.info(path))
    if current != fingerprint:
        raise OSError(f"slide changed since discovery (fingerprint {fingerprint} → {current})")
    return open_slide_uncached(uri)


def slide_info(slide: TiffSlide, mpp_override: float | None) -> SlideInfo:
    props = slide.properties
    mpp = props.get("tiffslide.mpp-x")
    width, height = slide.dimensions
    return SlideInfo(
        width=int(width),
        height=int(height),
        mpp=float(mpp_override) if mpp_override else (float(mpp) if mpp else None),
        vendor=props.get("tiffslide.vendor"),
        level_downsamples=tuple(float(d) for d in slide.level_downsamples),
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


def read_tile(slide: TiffSlide, x: int, y: int, plan: ReadPlan) -> np.ndarray:
    """One tile through `TiffSlide.read_region`: RGB uint8 (tile_px, tile_px, 3) for level-0 square (x, y)."""
    region = np.asarray(
        slide.read_region((int(x), int(y)), plan.level, (plan.read_px, plan.read_px), as_array=True)
    )
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    return np.ascontiguousarray(_to_tile(on_white(region), plan))


def read_tiles(
    slide: TiffSlide, uri: str, xs: list[int], ys: list[int], plan: ReadPlan
) -> Iterator[np.ndarray]:
    """Tiles at level-0 corners (xs, ys), in order.

    Tiled uint8 pages go through `RegionReader` (batched range reads, each TIFF tile decoded once);
    anything else through `read_region`. Both give the same pixels (a test holds them equal).
    Raises `SlideError` naming the level-0 position of a region that does not decode.
    """
    page = level_page(slide, plan.level)
    if not supports(page):
        yield from (read_tile(slide, x, y, plan) for x, y in zip(xs, ys, strict=True))
        return
    downsample = plan.level_downsample
    rects = [
        Rect(int(x / downsample), int(y / downsample), plan.read_px) for x, y in zip(xs, ys, strict=True)
    ]
    try:
        for region in RegionReader(uri, page).read(rects):
            yield np.ascontiguousarray(_to_tile(region, plan))
    except UnreadableRegion as exc:
        x0, y0 = round(exc.x * downsample), round(exc.y * downsample)
        raise SlideError(f"unreadable tile region at level-0 ({x0}, {y0}): {exc}") from None
