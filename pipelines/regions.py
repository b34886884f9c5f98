"""Fast region reads for tiled TIFF pyramids: fetch the byte ranges of all TIFF tiles a batch of regions
needs in one call, decode each TIFF tile once with the page's own codec, and cut the regions out.

`TiffSlide.read_region` pays a fixed cost per call (zarr selection, one read per TIFF tile) that
dominates at tile sizes of a few hundred pixels; reading a chunk of neighbouring tiles this way decodes
shared TIFF tiles once and lets object storage serve the ranges concurrently (`fs.cat_ranges`).
Pages this does not handle (stripped, planar, non-uint8) fall back to `read_region` in the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from fsspec.utils import merge_offset_ranges
from tifffile import TiffPage
from tiffslide import TiffSlide

from slidestream.cluster.storage import filesystem
from slidestream.pipelines.formats.handle import on_white

_GLASS = 255  # value for TIFF tiles a sparse file leaves out
_MAX_GAP = 256 * 1024  # merge byte ranges closer than this into one read
_MAX_BLOCK = 32 * 1024 * 1024  # but never read more than this at once


class UnreadableRegion(ValueError):
    """A TIFF tile whose bytes do not decode; `x`, `y` are its corner in pixels of its level."""

    def __init__(self, x: int, y: int, cause: Exception) -> None:
        super().__init__(f"TIFF tile at ({x}, {y}) does not decode: {type(cause).__name__}: {cause}")
        self.x, self.y = x, y


@dataclass(frozen=True)
class Rect:
    x: int  # in pixels of the level being read
    y: int
    size: int


def level_page(slide: TiffSlide, level: int) -> TiffPage:
    series = slide.ts_tifffile.series[slide.properties["tiffslide.series-index"]]
    return series.levels[level].keyframe


def supports(page: TiffPage) -> bool:
    return (
        page.is_tiled
        and page.planarconfig == 1
        and page.dtype == np.uint8
        and page.samplesperpixel in (3, 4)
        and page.imagedepth == 1
    )


class RegionReader:
    """Square regions of one pyramid level, read in batches."""

    def __init__(self, uri: str, page: TiffPage) -> None:
        self.fs, self.path = filesystem(uri)
        self.page = page
        self.tile_w, self.tile_h = page.tilewidth, page.tilelength
        self.across = -(-page.imagewidth // self.tile_w)
        self._decode = page.decode

    def _tile_indices(self, rect: Rect) -> list[int]:
        cols = range(rect.x // self.tile_w, (rect.x + rect.size - 1) // self.tile_w + 1)
        rows = range(rect.y // self.tile_h, (rect.y + rect.size - 1) // self.tile_h + 1)
        return [r * self.across + c for r in rows for c in cols]

    def _fetch(self, indices: list[int]) -> dict[int, bytes]:
        """Bytes of the given TIFF tiles. Neighbouring tiles are usually adjacent in the file, so ranges
        less than `_MAX_GAP` apart are merged into one request (one GET instead of dozens on S3)."""
        offsets, counts = self.page.dataoffsets, self.page.databytecounts
        present = sorted((int(offsets[i]), int(offsets[i] + counts[i]), i) for i in indices if counts[i] > 0)
        if not present:
            return {}
        _, starts, ends = merge_offset_ranges(
            [self.path] * len(present),
            [p[0] for p in present],
            [p[1] for p in present],
            max_gap=_MAX_GAP,
            max_block=_MAX_BLOCK,
            sort=False,
        )
        blocks = self.fs.cat_ranges([self.path] * len(starts), starts, ends)
        for block in blocks:
            if isinstance(block, Exception):
                raise block
        found: dict[int, bytes] = {}
        block_index = 0
        for start, end, index in present:
            while start >= ends[block_index]:
                block_index += 1
            base = starts[block_index]
            found[index] = bytes(blocks[block_index][start - base : end - base])
        return found

    def _decode_tile(self, index: int, data: bytes | None) -> np.ndarray:
        if data is None:
            return np.full((self.tile_h, self.tile_w, 3), _GLASS, np.uint8)
        try:
            segment, _, _ = self._decode(
                data, index, jpegtables=self.page.jpegtables, jpegheader=self.page.jpegheader
            )
            pixels = np.asarray(segment).reshape(self.tile_h, self.tile_w, -1)
        except Exception as exc:
            ty, tx = divmod(index, self.across)
            raise UnreadableRegion(tx * self.tile_w, ty * self.tile_h, exc) from None
        return on_white(pixels)

    def _cut(self, rect: Rect, decoded: dict[int, np.ndarray]) -> np.ndarray:
        out = np.empty((rect.size, rect.size, 3), np.uint8)
        for index in self._tile_indices(rect):
            ty, tx = divmod(index, self.across)
            tile_x0, tile_y0 = tx * self.tile_w, ty * self.tile_h
            x0, y0 = max(rect.x, tile_x0), max(rect.y, tile_y0)
            x1 = min(rect.x + rect.size, tile_x0 + self.tile_w)
            y1 = min(rect.y + rect.size, tile_y0 + self.tile_h)
            out[y0 - rect.y : y1 - rect.y, x0 - rect.x : x1 - rect.x] = decoded[index][
                y0 - tile_y0 : y1 - tile_y0, x0 - tile_x0 : x1 - tile_x0
            ]
        return out

    def read(self, rects: Iterable[Rect], batch: int = 32) -> Iterator[np.ndarray]:
        """The regions in order; TIFF tiles shared by regions of one batch are fetched and decoded once."""
        pending: list[Rect] = []
        for rect in rects:
            pending.append(rect)
            if len(pending) == batch:
                yield from self._read_batch(pending)
                pending = []
        if pending:
            yield from self._read_batch(pending)

    def _read_batch(self, rects: list[Rect]) -> Iterator[np.ndarray]:
        needed = sorted({i for rect in rects for i in self._tile_indices(rect)})
        blobs = self._fetch(needed)
        decoded = {i: self._decode_tile(i, blobs.get(i)) for i in needed}
        for rect in rects:
            yield self._cut(rect, decoded)
