"""Giga-SSL views: one parameter draw per augmentation, shared by all its tiles; counts and coordinates."""

from __future__ import annotations

import numpy as np

from slidestream.cluster.storage import join
from slidestream.pipelines.embed import EmbedStage, run_embed
from slidestream.pipelines.features import FeatureBags
from slidestream.pipelines.gigassl_views import ViewParams, apply_view, draw_params, sample_views, slide_rng
from slidestream.pipelines.ingest import run_ingest
from slidestream.testing.helpers import committed_samples, make_config

IDENTITY = ViewParams(
    crop=(0.0, 0.0, 1.0, 1.0), jitter=None, jitter_order=(0, 1, 2, 3), grayscale=False, blur_sigma=None
)


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_identity_view_is_the_tile():
    tiles = _tiles(3)
    np.testing.assert_array_equal(apply_view(tiles, IDENTITY, 32), tiles)


def test_one_draw_is_applied_identically_to_every_tile():
    tiles = _tiles(4)
    params = ViewParams(
        crop=(0.1, 0.2, 0.6, 0.7),
        jitter=(1.3, 0.7, 1.2, 0.1),
        jitter_order=(2, 0, 3, 1),
        grayscale=False,
        blur_sigma=0.6,
    )
    together = apply_view(tiles, params, 24)
    one_by_one = np.concatenate([apply_view(t[None], params, 24) for t in tiles])
    np.testing.assert_array_equal(together, one_by_one)
    same = apply_view(np.stack([tiles[0]] * 3), params, 24)
    assert (same == same[0]).all()


def test_draws_follow_the_recipe_and_differ():
    rng = np.random.default_rng(1)
    draws = [draw_params(rng) for _ in range(400)]
    areas = [p.crop[2] * p.crop[3] for p in draws]
    assert min(areas) >= 0.45 and max(areas) <= 1.0 + 1e-9
    assert 0.7 < np.mean([p.jitter is not None for p in draws]) < 0.9
    assert 0.12 < np.mean([p.grayscale for p in draws]) < 0.28
    assert 0.4 < np.mean([p.blur_sigma is not None for p in draws]) < 0.6
    assert all(0.1 <= p.blur_sigma <= 1.0 for p in draws if p.blur_sigma is not None)
    tiles = _tiles(2)
    assert not np.array_equal(apply_view(tiles, draws[0], 32), apply_view(tiles, draws[1], 32))


def test_sampling_is_with_replacement_and_stable_per_slide():
    a = sample_views(5, 3, 20, slide_rng(0, "s1"))
    b = sample_views(5, 3, 20, slide_rng(0, "s1"))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert len(a) == 3 and all(len(x) == 20 and x.max() < 5 for x in a)
    assert any(len(set(x.tolist())) < 20 for x in a)  # 20 draws from 5 tiles repeat
    assert not np.array_equal(a[0], sample_views(5, 1, 20, slide_rng(0, "s2"))[0])


def test_views_stage_writes_naug_by_nt_rows(ray_local, slide_root, tmp_path):
    config = make_config("tiling.tile_px=128", "embed.input_px=64", "embed.dtype=float32")
    out = str(tmp_path / "out")
    run_ingest(str(slide_root), out, config)
    views = EmbedStage("resnet18_trunc", "random", config.tiling, config.embed, views=(3, 5))
    report = run_embed(out, config, views)
    assert len(report.ok) == 4 and report.tiles == 4 * 3 * 5, report.summary()
    assert views.stage.startswith("gigassl/")
    tile_keys = set(committed_samples(out, config))
    for bag in FeatureBags(join(out, views.stage), require_labels=False):
        assert len(bag.features) == 15 and sorted(set(bag.aug.tolist())) == [0, 1, 2]
        assert all(f"{bag.slide_id}/{x}_{y}" in tile_keys for x, y in bag.coords.tolist())
    assert run_embed(out, config, views).skipped_unchanged == 4
