"""From tile coordinates to Giga-SSL's sparse maps: views, coordinate augmentation, the size rule and
duplicate merging, and the batch (one spconv tensor for many slides).

A view of a slide is T tiles drawn with replacement from ONE stored augmentation. Its level-0 (x, y)
corners are augmented (random rotation, h/v flips, per-axis scale U(0.7, 1.3), translation), divided by
the cell size (level-0 px per map cell), shifted to start at 0 and truncated; tiles that land on the same
cell are merged by averaging their features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from slidestream.pipelines.features import Bag, FeatureBagError

__all__ = [
    "SparseBatch",
    "augment_coords",
    "build_batch",
    "draw_view",
    "grid_step",
    "map_size",
    "merge_duplicates",
    "to_cells",
]

MIN_SIZE = 5
SCALE_RANGE = (0.7, 1.3)


def map_size(extent: int) -> int:
    """Spatial size of one map axis from its largest cell index + 1: at least 5, odd, and with size // 2
    odd, so that every cell (also the last) falls inside a 3×3 stride-2 window and so does every cell of
    the next level."""
    size = max(int(extent), MIN_SIZE)
    if size % 2 == 0:
        size += 1
    while (size // 2) % 2 == 0:
        size += 2
    return size


def grid_step(coords: np.ndarray, slide_id: str) -> float:
    """The tile grid's step in level-0 px (the smallest positive spacing of x or y), used as the map cell
    when `gigassl.cell_px` is not set; a slide whose tiles all share one corner has step 1."""
    steps = []
    for axis in range(2):
        values = np.unique(coords[:, axis])
        if len(values) > 1:
            steps.append(np.diff(values).min())
    if not steps:
        return 1.0
    step = float(min(steps))
    if step <= 0:
        raise FeatureBagError(f"slide {slide_id}: tile coordinates give no positive grid step")
    return step


def augment_coords(xy: np.ndarray, rng: np.random.Generator, cell: float) -> np.ndarray:
    """Rotation by a random angle, random flips of each axis, per-axis scale and a translation of up to one
    cell, on (N, 2) level-0 coordinates (float)."""
    angle = rng.uniform(0, 2 * math.pi)
    c, s = math.cos(angle), math.sin(angle)
    out = xy @ np.array([[c, -s], [s, c]]).T
    flips = np.where(rng.random(2) < 0.5, -1.0, 1.0)
    out = out * flips * rng.uniform(*SCALE_RANGE, size=2)
    return out + rng.uniform(0, cell, size=2)


def to_cells(xy: np.ndarray, cell: float) -> np.ndarray:
    """Map cells (N, 2) int64 of level-0 coordinates: divided by the cell size, shifted by whole cells to
    start at 0, truncated (the shift is whole cells so that a sub-cell translation still moves tiles)."""
    scaled = np.asarray(xy, dtype=np.float64) / cell
    return np.floor(scaled - np.floor(scaled.min(axis=0))).astype(np.int64)


def merge_duplicates(cells: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One site per distinct row of `cells` (N, k) with the mean of its features (N, D)."""
    unique, inverse = torch.unique(cells, dim=0, return_inverse=True)
    sums = features.new_zeros(len(unique), features.shape[1]).index_add_(0, inverse, features)
    counts = torch.bincount(inverse, minlength=len(unique)).to(features.dtype)
    return unique, sums / counts[:, None]


def draw_view(bag: Bag, n_tiles: int, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """A view: one stored augmentation chosen at random and `n_tiles` of its rows drawn with replacement;
    its coordinates (float level-0) and features. Plain feature bags (no `aug`) count as one augmentation."""
    if bag.aug is None:
        rows = np.arange(len(bag.features))
    else:
        aug = bag.aug.numpy()
        rows = np.flatnonzero(aug == rng.choice(np.unique(aug)))
    pick = rows[rng.integers(0, len(rows), size=n_tiles)]
    return bag.coords.numpy()[pick].astype(np.float64), bag.features[torch.from_numpy(pick)]


@dataclass
class SparseBatch:
    """Active sites of B slide maps: features (N, D), indices (N, 3) int32 = (slide, row, col)."""

    features: torch.Tensor
    indices: torch.Tensor
    spatial_shape: list[int]
    batch_size: int

    def tensor(self, device: torch.device | str = "cpu"):
        """The spconv SparseConvTensor on `device`."""
        from slidestream.trainers.spconv_compat import spconv

        return spconv.SparseConvTensor(
            self.features.to(device), self.indices.to(device), self.spatial_shape, self.batch_size
        )


def build_batch(maps: list[tuple[np.ndarray, torch.Tensor]]) -> SparseBatch:
    """One batch from per-slide (cells (N, 2) as (x, y), features (N, D)): rows are y, columns x;
    duplicate cells merged; one spatial shape for all (the size rule on the largest extent per axis)."""
    indices, features = [], []
    for b, (cells, feats) in enumerate(maps):
        rc = torch.as_tensor(np.asarray(cells)[:, ::-1].copy(), dtype=torch.int64)
        sites, merged = merge_duplicates(rc, feats.float())
        indices.append(torch.cat([torch.full((len(sites), 1), b, dtype=torch.int64), sites], dim=1))
        features.append(merged)
    idx = torch.cat(indices)
    shape = [map_size(int(idx[:, 1].max()) + 1), map_size(int(idx[:, 2].max()) + 1)]
    return SparseBatch(torch.cat(features), idx.to(torch.int32), shape, len(maps))
