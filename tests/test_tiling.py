import numpy as np
import pytest

from slidestream.cluster.config import TilingConfig
from slidestream.pipelines.tiling import choose_level, grid_positions, read_plan
from slidestream.pipelines.tissue import TissueMask


def test_level_choice_never_upsamples():
    downsamples = (1.0, 4.0003, 16.001)
    assert choose_level(downsamples, 2.0) == 0
    assert choose_level(downsamples, 4.0) == 1
    assert choose_level(downsamples, 8.0) == 1
    assert choose_level(downsamples, 16.0) == 2
    assert choose_level(downsamples, 100.0) == 2


def test_read_plan_is_micrometre_exact():
    plan = read_plan(0.25, (1.0, 4.0, 16.0), TilingConfig(mpp=0.5, tile_px=256))
    assert plan.level == 0 and plan.read_px == 512 and plan.side0 == 512  # 512 px × 0.25 µm = 128 µm
    plan = read_plan(0.25, (1.0, 4.0, 16.0), TilingConfig(mpp=2.0, tile_px=224))
    assert plan.level == 1 and plan.read_px == 448 and plan.side0 == 1792  # 224 px × 2 µm = 448 µm


def test_coarser_slide_than_target_is_refused():
    with pytest.raises(ValueError, match="does not upsample"):
        read_plan(1.0, (1.0,), TilingConfig(mpp=0.5))


def test_grid_covers_only_whole_tiles_and_overlap_shrinks_stride():
    plan = read_plan(0.5, (1.0,), TilingConfig(mpp=0.5, tile_px=100))
    xs, ys = grid_positions(350, 220, plan, TilingConfig(mpp=0.5, tile_px=100))
    assert sorted(set(xs.tolist())) == [0, 100, 200] and sorted(set(ys.tolist())) == [0, 100]
    overlapping = TilingConfig(mpp=0.5, tile_px=100, overlap_px=50)
    xs, _ = grid_positions(350, 220, plan, overlapping)
    assert sorted(set(xs.tolist())) == [0, 50, 100, 150, 200, 250]


def test_tissue_fractions_from_mask():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half is tissue; 1 mask px = 32 level-0 px
    tissue = TissueMask(mask, 32.0)
    fracs = tissue.fractions(np.array([0, 128, 160]), np.array([0, 0, 0]), 64.0)
    np.testing.assert_allclose(fracs, [1.0, 0.5, 0.0])
