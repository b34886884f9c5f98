"""µm-exact tile grids: where tiles are in level-0 pixels and which pyramid level they are read from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slidestream.cluster.config import TilingConfig

_LEVEL_TOLERANCE = 1.002  # level downsamples from image sizes are not exact (e.g. 4.0007)


@dataclass(frozen=True)
class ReadPlan:
    """How one tile is read: `read_px` pixels at `level`, then resized to `tile_px`."""

    level: int
    level_downsample: float
    read_px: int
    tile_px: int
    side0: float  # tile edge in level-0 pixels (= tile_px · target mpp / slide mpp)


def choose_level(level_downsamples: list[float] | tuple[float, ...], target_downsample: float) -> int:
    """The coarsest level that is still at least as fine as the target (never upsample a coarser level)."""
    candidates = [i for i, d in enumerate(level_downsamples) if d <= target_downsample * _LEVEL_TOLERANCE]
    if not candidates:
        return 0
    return max(candidates, key=lambda i: level_downsamples[i])


def read_plan(
    slide_mpp: float, level_downsamples: list[float] | tuple[float, ...], cfg: TilingConfig
) -> ReadPlan:
    target = cfg.mpp / slide_mpp
    if target < 1 / _LEVEL_TOLERANCE:
        raise ValueError(
            f"slide resolution {slide_mpp:.4g} µm/px is coarser than the target {cfg.mpp:.4g} µm/px; "
            "slidestream does not upsample"
        )
    level = choose_level(level_downsamples, target)
    side0 = cfg.tile_px * target
    return ReadPlan(
        level, float(level_downsamples[level]), round(side0 / level_downsamples[level]), cfg.tile_px, side0
    )


def grid_positions(
    width: int, height: int, plan: ReadPlan, cfg: TilingConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 top-left corners of every whole tile inside the slide, row-major."""
    stride0 = (cfg.tile_px - cfg.overlap_px) * plan.side0 / cfg.tile_px
    n_x = int(np.floor((width - plan.side0) / stride0)) + 1 if width >= plan.side0 else 0
    n_y = int(np.floor((height - plan.side0) / stride0)) + 1 if height >= plan.side0 else 0
    xs = np.round(np.arange(n_x) * stride0).astype(np.int64)
    ys = np.round(np.arange(n_y) * stride0).astype(np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return grid_x.ravel(), grid_y.ravel()
