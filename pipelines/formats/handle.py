"""The interface every slide reader offers: pyramid geometry, mpp, and RGB region reads.

Locations are level-0 pixels and sizes are pixels of the level read (OpenSlide's convention); a level-0
location maps to level pixels by truncation, as tiffslide and OpenSlide do, so every backend cuts the
same tile grid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar, Self

import numpy as np


def on_white(pixels: np.ndarray) -> np.ndarray:
    """RGB pixels; an alpha channel is composited onto white glass."""
    if pixels.shape[2] != 4:
        return pixels
    alpha = pixels[..., 3:4].astype(np.float32) / 255.0
    return (pixels[..., :3] * alpha + 255.0 * (1 - alpha)).astype(np.uint8)


def as_rgb(pixels: np.ndarray) -> np.ndarray:
    """RGB uint8 (h, w, 3) from a reader's grey, RGB or RGBA output."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return on_white(pixels)


class SlideHandle(ABC):
    """An open slide. Subclasses give the level sizes, the mpp and a region read; the rest is shared."""

    backend: ClassVar[str]  # recorded in the ledger for every slide

    def __init__(self, uri: str) -> None:
        self.uri = uri

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) of each pyramid level, largest first."""

    @property
    @abstractmethod
    def mpp(self) -> float | None:
        """µm per level-0 pixel from the format's own metadata, or None when the slide does not say."""

    @property
    def vendor(self) -> str | None:
        return None

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (height, width, 3) of `level` from level-0 `location`; outside the slide is glass."""

    def read_regions(self, xs: Sequence[int], ys: Sequence[int], level: int, px: int) -> Iterator[np.ndarray]:
        """Square `px` regions of `level` at level-0 corners (xs, ys), in order. Backends that can fetch
        a batch of regions at once override this."""
        for x, y in zip(xs, ys, strict=True):
            yield self.read_region((int(x), int(y)), level, (px, px))

    def close(self) -> None:  # noqa: B027 - most backends hold nothing that needs closing
        """Release files and scratch space the handle holds."""

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Mean of the width and height ratios to level 0 (what OpenSlide and tiffslide report)."""
        w0, h0 = self.dimensions
        return tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)

    def level_xy(self, location: tuple[int, int], level: int) -> tuple[int, int]:
        """A level-0 location in pixels of `level`, truncated."""
        downsample = self.level_downsamples[level]
        return int(location[0] / downsample), int(location[1] / downsample)

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level whose downsample does not exceed `downsample`."""
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample > downsample:
                break
            best = level
        return best

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
