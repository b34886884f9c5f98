"""DICOM-WSI slides through wsidicom, straight from local disk or object storage (range reads).

A DICOM slide is a series: one instance (file) per pyramid level, plus optional label, overview and
thumbnail instances, in one folder; the slide's URI is that folder, or a single instance file. wsidicom
numbers levels by their power-of-two scale; here they are numbered 0, 1, 2, … like every other backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from wsidicom import WsiDicom

from slidestream.cluster.storage import is_local, storage_options
from slidestream.pipelines.formats.handle import SlideHandle, as_rgb

_GLASS = 255
# Object storage is read in blocks of this size (wsidicom reads an instance's header and its frames'
# offset table once, then one block per frame run): small enough that a tile costs about its own bytes.
_BLOCK_BYTES = 64 * 1024


def file_options(uri: str) -> dict[str, Any]:
    """fsspec options for wsidicom: the project's storage options with block-sized range reads."""
    if is_local(uri):
        return {}
    return {**storage_options(uri), "default_block_size": _BLOCK_BYTES, "default_cache_type": "readahead"}


class DicomHandle(SlideHandle):
    backend = "wsidicom"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        path = uri.removeprefix("file://") if is_local(uri) else uri
        self.wsi = WsiDicom.open(path, file_options=file_options(uri))
        if not self.wsi.levels:
            self.wsi.close()
            raise ValueError("no DICOM-WSI pyramid level (VOLUME instance) in the series")

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((level.size.width, level.size.height) for level in self.wsi.levels)

    @property
    def mpp(self) -> float | None:
        """From the base level's Pixel Spacing (mm) in the shared functional groups."""
        spacing = self.wsi.levels[0].mpp
        return float(spacing.width) if spacing is not None else None

    @property
    def vendor(self) -> str | None:
        return "dicom"

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Only the part inside the level is read (wsidicom refuses regions that cross its edge)."""
        x, y = self.level_xy(location, level)
        width, height = size
        level_w, level_h = self.level_dimensions[level]
        out = np.full((height, width, 3), _GLASS, np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        if x1 > x0 and y1 > y0:
            scale = self.wsi.levels[level].level
            inside = self.wsi.read_region((x0, y0), scale, (x1 - x0, y1 - y0), as_array=True)
            out[y0 - y : y1 - y, x0 - x : x1 - x] = as_rgb(np.asarray(inside))
        return out

    def close(self) -> None:
        self.wsi.close()
