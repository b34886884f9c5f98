"""Opening slides (local or object storage, range reads through fsspec) and reading tiles from them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tiffslide import TiffSlide

from cluster.storage import filesystem, is_local, scrub_secrets, storage_options
from pipelines.slides import fingerprint_of
from pipelines.tiling import ReadPlan


class SlideError(Exception):
    """A slide that cannot be processed. `permanent` errors are not retried until the file changes."""

    def __init__(self, slide_id: str, reason: str, permanent: bool = True) -> None:
        super().__init__(f"{slide_id}: {reason}")
        self.slide_id = slide_id
        self.reason = scrub_secrets(reason)
        self.permanent = permanent


def classify(slide_id: str, what: str, exc: BaseException) -> SlideError:
    """Storage/network errors are transient (retried on the next run); anything else is permanent."""
    if isinstance(exc, SlideError):
        return exc
    transient = isinstance(exc, OSError | ConnectionError | TimeoutError)
    return SlideError(slide_id, f"{what}: {type(exc).__name__}: {exc}", permanent=not transient)


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


def read_tile(slide: TiffSlide, x: int, y: int, plan: ReadPlan) -> np.ndarray:
    """RGB uint8 (tile_px, tile_px, 3) covering level-0 square (x, y, side0), read at `plan.level`."""
    region = slide.read_region((int(x), int(y)), plan.level, (plan.read_px, plan.read_px), as_array=True)
    region = np.asarray(region)
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    if region.shape[2] == 4:  # composite transparent pixels onto white glass
        alpha = region[..., 3:4].astype(np.float32) / 255.0
        region = (region[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)
    if plan.read_px != plan.tile_px:
        region = np.asarray(Image.fromarray(region).resize((plan.tile_px, plan.tile_px), Image.BOX))
    return np.ascontiguousarray(region)
