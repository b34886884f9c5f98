"""Pictures: slide thumbnails (bounded reads), attention heatmaps (tile placement, rank colours, PNG) and
training curves, on real synthetic slides."""

from __future__ import annotations

import io
import re
from pathlib import Path

import fsspec
import numpy as np
import pytest
from matplotlib._pylab_helpers import Gcf
from PIL import Image
from tiffslide import TiffSlide

from slidestream.pipelines.formats.errors import SlideError
from slidestream.pipelines.synthetic import SIZES, SlideSpec, write_slide
from slidestream.trainers import viz
from slidestream.trainers.viz import (
    attention_heatmap,
    rank_normalise,
    slide_heatmap,
    slide_thumbnail,
    training_curves,
)

# Layout of `attention_heatmap` PNGs: the thumbnail is drawn 1:1 this many pixels from the left and top.
_LEFT, _TOP_TITLED = 15, 45


@pytest.fixture(scope="module")
def svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny (8192 x 6144, 0.25 µm/px) pyramidal SVS slide: levels at downsample 1, 4, 16."""
    path = tmp_path_factory.mktemp("viz") / "tiny.svs"
    write_slide(path, SlideSpec(*SIZES["tiny"], seed=5))
    return path


@pytest.fixture(scope="module")
def no_mpp_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generic tiled TIFF without resolution tags and without a pyramid (level 0 only)."""
    path = tmp_path_factory.mktemp("viz") / "no_mpp.tiff"
    write_slide(path, SlideSpec(1024, 768, mpp=None, fmt="tiff", seed=6))
    return path


def _png(path: Path | str) -> Image.Image:
    image = Image.open(io.BytesIO(Path(path).read_bytes()))
    assert image.format == "PNG"
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------------
# thumbnails


@pytest.mark.parametrize("max_px", [1024, 700, 300])
def test_thumbnail_fits_and_downsample_matches_dimensions(svs: Path, max_px: int) -> None:
    thumb, downsample = slide_thumbnail(str(svs), max_px=max_px)
    w0, h0 = SIZES["tiny"]
    assert thumb.mode == "RGB"
    assert max(thumb.size) <= max_px
    assert max(thumb.size) >= max_px - 1  # uses the room it is given
    # every thumbnail pixel covers `downsample` level-0 pixels; the slide edge lies in the last pixel
    assert thumb.width * downsample <= w0 < (thumb.width + 1) * downsample
    assert thumb.height * downsample <= h0 < (thumb.height + 1) * downsample


def test_thumbnail_reads_a_small_level_never_level0(svs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, tuple[int, int]]] = []
    original = TiffSlide.read_region

    def spy(self, location, level, size, **kwargs):
        calls.append((level, tuple(size)))
        return original(self, location, level, size, **kwargs)

    monkeypatch.setattr(TiffSlide, "read_region", spy)
    thumb, downsample = slide_thumbnail(str(svs), max_px=1024)
    assert calls and all(level == 1 for level, _ in calls), calls  # downsample 8 → the 4x level
    assert downsample == pytest.approx(8.0)

    calls.clear()
    exact, downsample = slide_thumbnail(str(svs), max_px=512)
    assert all(level == 2 for level, _ in calls) and downsample == pytest.approx(16.0)
    with TiffSlide(str(svs)) as slide:
        level2 = np.asarray(slide.read_region((0, 0), 2, (512, 384), as_array=True))[..., :3]
    np.testing.assert_array_equal(np.asarray(exact), level2)  # right level, not shifted or flipped
    # the 1024 px thumbnail shows the same picture (drawn from another level)
    halved = np.asarray(thumb.reduce(2), dtype=np.float32)
    assert np.abs(halved - level2).mean() < 6


def test_banded_thumbnail_equals_one_pass_resize(no_mpp_tiff: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slide without a pyramid is reduced band by band; bands leave no seams."""
    with TiffSlide(str(no_mpp_tiff)) as slide:
        assert slide.level_count == 1
        full = Image.fromarray(np.asarray(slide.read_region((0, 0), 0, (1024, 768), as_array=True))[..., :3])
    monkeypatch.setattr(viz, "_BAND_PIXELS", 1024 * 40)  # ~40 level rows per band: many bands
    for max_px, size in [(256, (256, 192)), (300, (300, 225))]:
        thumb, downsample = slide_thumbnail(str(no_mpp_tiff), max_px=max_px)
        assert thumb.size == size
        assert downsample == pytest.approx(1024 / max_px)
        reference = np.asarray(full.resize(size, Image.Resampling.BOX), dtype=np.int16)
        assert np.abs(np.asarray(thumb, dtype=np.int16) - reference).max() <= 2


# --------------------------------------------------------------------------------------------------------
# heatmaps


def test_rank_normalise_resists_outliers_and_ties() -> None:
    np.testing.assert_allclose(rank_normalise(np.array([1.0, 2.0, 3.0, 1e9])), [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(rank_normalise(np.array([5.0, 1.0, 5.0])), [0.75, 0.0, 0.75])
    np.testing.assert_allclose(rank_normalise(np.array([2.0, 2.0])), [0.5, 0.5])
    np.testing.assert_allclose(rank_normalise(np.array([7.0])), [0.5])


def test_heatmap_places_tiles_and_leaves_the_rest_untouched(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    thumbnail = Image.fromarray(rng.integers(150, 250, (120, 200, 3), dtype=np.uint8))
    # downsample 4, tiles of 64 level-0 px → 16 x 16 thumbnail px
    coords = np.array([[0, 0], [64, 0], [128, 64], [640, 320]])
    scores = np.array([0.001, 50.0, 0.002, np.nan])  # a huge score, two tiny ones, one unscored tile
    out = tmp_path / "deep" / "dir" / "heat.png"
    score_map = attention_heatmap(thumbnail, 4.0, coords, 64.0, scores, str(out), title="placement")

    assert score_map.shape == (120, 200)
    assert np.all(score_map[0:16, 16:32] == 1.0)  # the highest score, at x 64..128, y 0..64 level-0
    assert np.all(score_map[0:16, 0:16] == 0.0)
    assert np.all(score_map[16:32, 32:48] == 0.5)  # rank, not value: not washed out by the 50.0
    assert np.isfinite(score_map).sum() == 3 * 16 * 16  # NaN everywhere else (incl. the NaN-scored tile)

    png = np.asarray(_png(out), dtype=np.int16)
    assert png.shape[1] >= 200 + _LEFT and png.shape[0] >= 120 + _TOP_TITLED
    assert png.shape[1] < 200 + 150 and png.shape[0] < 120 + 100
    shown = png[_TOP_TITLED : _TOP_TITLED + 120, _LEFT : _LEFT + 200]
    original = np.asarray(thumbnail, dtype=np.int16)
    untiled = np.isnan(score_map)
    untiled[1:-1, 1:-1] &= np.isnan(score_map[:-2, 1:-1]) & np.isnan(score_map[2:, 1:-1])  # off tile edges
    untiled[1:-1, 1:-1] &= np.isnan(score_map[1:-1, :-2]) & np.isnan(score_map[1:-1, 2:])
    assert np.abs(shown - original)[untiled].max() <= 2, "untiled areas must show the thumbnail as is"
    tiled = np.abs(shown - original)[2:14, 18:30].mean(axis=-1)
    assert tiled.min() > 20, "the top tile must be coloured"


def test_slide_heatmap_sizes_tiles_from_mpp(svs: Path, tmp_path: Path) -> None:
    # bag tiles: 256 px at 0.5 µm/px = 512 level-0 px on this 0.25 µm/px slide = 64 thumbnail px
    coords = np.array([[1024, 2048], [4096, 0], [0, 4096]])
    out = tmp_path / "heat.png"
    score_map = slide_heatmap(str(svs), coords, np.array([3.0, 1.0, 2.0]), 256, 0.5, str(out), title="t")
    assert score_map.shape == (768, 1024)
    assert np.all(score_map[256:320, 128:192] == 1.0)
    assert np.all(score_map[0:64, 512:576] == 0.0)
    assert np.all(score_map[512:576, 0:64] == 0.5)
    assert np.isfinite(score_map).sum() == 3 * 64 * 64
    image = _png(out)
    assert 1024 <= image.width < 1024 + 150 and 768 <= image.height < 768 + 100


def test_missing_mpp_is_an_error_naming_the_slide(no_mpp_tiff: Path, tmp_path: Path) -> None:
    out = tmp_path / "heat.png"
    with pytest.raises(SlideError, match=re.escape(str(no_mpp_tiff))) as info:
        slide_heatmap(str(no_mpp_tiff), np.array([[0, 0]]), np.array([1.0]), 256, 0.5, str(out))
    assert "mpp" in str(info.value)
    assert not out.exists()
    # with the slide's mpp supplied by the caller it draws
    score_map = slide_heatmap(
        str(no_mpp_tiff), np.array([[0, 0]]), np.array([1.0]), 256, 0.5, str(out), slide_mpp=0.5
    )
    assert np.isfinite(score_map).sum() == 256 * 256  # 256 level-0 px = 256 thumbnail px (downsample 1)
    assert out.exists()


def test_object_storage_uris(svs: Path) -> None:
    """Non-local URIs go through fsspec both ways (memory:// stands in for s3:// here)."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/vizslides/tiny.svs", svs.read_bytes())
    thumb, downsample = slide_thumbnail("memory://vizslides/tiny.svs", max_px=256)
    assert max(thumb.size) == 256 and downsample == pytest.approx(32.0)
    attention_heatmap(thumb, downsample, np.array([[0, 0]]), 512.0, np.array([1.0]), "memory://vizout/h.png")
    image = Image.open(io.BytesIO(fs.cat_file("/vizout/h.png")))
    assert image.format == "PNG" and image.width >= 256
    fs.rm("/vizslides", recursive=True)
    fs.rm("/vizout", recursive=True)


def test_heatmap_rejects_mismatched_inputs(tmp_path: Path) -> None:
    thumb = Image.new("RGB", (50, 40))
    with pytest.raises(ValueError, match="one score per tile"):
        attention_heatmap(thumb, 2.0, np.zeros((3, 2)), 8.0, np.ones(2), str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------------------------------------
# training curves


def test_training_curves_two_runs(tmp_path: Path) -> None:
    histories = {
        "fold0": [{"epoch": e, "train_loss": 1 / (e + 1), "val_auc": 0.5 + e / 20} for e in range(6)],
        "fold1": [{"epoch": e, "train_loss": 1.3 / (e + 1), "val_auc": 0.6 + e / 30} for e in range(4)],
    }
    out = tmp_path / "runs" / "r" / "curves.png"
    drawn = training_curves(histories, str(out))
    assert drawn == ["train_loss", "val_auc"]  # val_loss is in no record: no empty panel
    two = _png(out)
    training_curves(histories, str(out), metrics=("train_loss",))
    one = _png(out)
    assert two.width > one.width + 250  # one panel per metric
    pixels = np.asarray(two)
    assert (pixels < 200).any(axis=-1).mean() > 0.01, "lines and text are drawn"
    assert Gcf.get_num_fig_managers() == 0  # nothing registered with pyplot, nothing left open
    with pytest.raises(ValueError, match="metrics"):
        training_curves(histories, str(tmp_path / "none.png"), metrics=("val_f1",))
