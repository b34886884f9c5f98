"""TIFF slides through tiffslide: Aperio SVS, generic pyramidal TIFF, OME-TIFF, and the TIFF dialects
tiffslide knows (Hamamatsu NDPI, Ventana BIF, Leica SCN).

tiffslide leaves the mpp of an OME-TIFF and of a Ventana BIF empty unless resolution tags give it; it is
read here from their own fields: the OME-XML `Pixels/@PhysicalSizeX`, and the `ScanRes` (µm/px) of the
BIF's `iScan` XMP element, where OpenSlide reads it too.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence

import numpy as np
import tifffile
from tiffslide import TiffSlide

from slidestream.cluster.storage import is_local, storage_options
from slidestream.pipelines.formats.errors import SlideError
from slidestream.pipelines.formats.handle import SlideHandle, as_rgb
from slidestream.pipelines.regions import Rect, RegionReader, UnreadableRegion, level_page, supports

_UM_PER_UNIT = {"pm": 1e-6, "nm": 1e-3, "µm": 1.0, "um": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}


def ome_mpp(ome_xml: str) -> float | None:
    """µm per pixel of the first OME image (`Pixels@PhysicalSizeX` in its unit, µm by default)."""
    root = ElementTree.fromstring(ome_xml)
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or pixels.get("PhysicalSizeX") is None:
        return None
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    if unit not in _UM_PER_UNIT:
        raise ValueError(f"OME PhysicalSizeXUnit {unit!r} is not a length unit slidestream knows")
    return float(pixels.get("PhysicalSizeX", "")) * _UM_PER_UNIT[unit]


_SCAN_RES = re.compile(rb"<iScan\b[^>]*?\bScanRes\s*=\s*\"([0-9.eE+-]+)\"")
_XMP_TAG = 700


def ventana_mpp(tif: tifffile.TiffFile) -> float | None:
    """µm per pixel from a Ventana BIF's XMP (`<iScan ScanRes="…">`), on the first page that has it."""
    for page in tif.pages:
        tag = page.tags.get(_XMP_TAG)  # type: ignore[union-attr]
        found = _SCAN_RES.search(bytes(tag.value)) if tag is not None else None
        if found:
            return float(found.group(1))
    return None


def dialect_mpp(tif: tifffile.TiffFile) -> float | None:
    """The mpp a TIFF dialect keeps in its own metadata, where tiffslide does not look."""
    if tif.is_ome and tif.ome_metadata:
        return ome_mpp(tif.ome_metadata)
    if tif.is_bif:
        return ventana_mpp(tif)
    return None


class TiffHandle(SlideHandle):
    backend = "tiffslide"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        if is_local(uri):
            self.slide = TiffSlide(uri.removeprefix("file://"))
        else:
            self.slide = TiffSlide(uri, storage_options=storage_options(uri))

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self.slide.level_dimensions)

    @property
    def mpp(self) -> float | None:
        mpp = self.slide.properties.get("tiffslide.mpp-x")
        return float(mpp) if mpp else dialect_mpp(self.slide.ts_tifffile)

    @property
    def vendor(self) -> str | None:
        tif = self.slide.ts_tifffile
        vendor = self.slide.properties.get("tiffslide.vendor")
        return vendor or ("ome" if tif.is_ome else "ventana" if tif.is_bif else None)

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return as_rgb(np.asarray(self.slide.read_region(location, level, size, as_array=True)))

    def read_regions(self, xs: Sequence[int], ys: Sequence[int], level: int, px: int) -> Iterator[np.ndarray]:
        """Tiled uint8 pages go through `RegionReader` (batched range reads, each TIFF tile decoded once);
        anything else through `read_region`. Both give the same pixels (a test holds them equal)."""
        page = level_page(self.slide, level)
        if not supports(page):
            yield from super().read_regions(xs, ys, level, px)
            return
        downsample = self.level_downsamples[level]
        rects = [Rect(int(x / downsample), int(y / downsample), px) for x, y in zip(xs, ys, strict=True)]
        try:
            yield from RegionReader(self.uri, page).read(rects)
        except UnreadableRegion as exc:
            x0, y0 = round(exc.x * downsample), round(exc.y * downsample)
            raise SlideError(f"unreadable tile region at level-0 ({x0}, {y0}): {exc}") from None

    def close(self) -> None:
        self.slide.close()
