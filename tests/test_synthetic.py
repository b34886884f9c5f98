"""Synthetic slide generator: real pyramids that tiffslide reads, consistent levels, truthful masks."""

from __future__ import annotations

import csv
import hashlib
import io
import json

import fsspec
import numpy as np
import pytest
from PIL import Image
from tiffslide import TiffSlide

from slidestream.cli import main
from slidestream.pipelines.synthetic import (
    MASK_DOWNSAMPLE,
    SIZES,
    SlideSpec,
    SynthError,
    _SlideModel,
    cohort_specs,
    sample_tiles,
    write_dataset,
    write_slide,
)

SMALL = (2048, 1536)  # quick slides for metadata and determinism checks


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def positive_svs(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "pos.svs"
    spec = SlideSpec(*SIZES["tiny"], positive=True, pen_marks=True, faint_tissue=True, seed=1)
    truth = write_slide(path, spec)
    return path, spec, truth


@pytest.fixture(scope="module")
def negative_tiff(tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "neg.tiff"
    spec = SlideSpec(4352, 2304, mpp=0.5, fmt="tiff", positive=False, seed=2)
    truth = write_slide(path, spec)
    return path, spec, truth


def _level_rgb(slide: TiffSlide, level: int) -> np.ndarray:
    return np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB"))


def _mask_at(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Upsample a truth mask (nearest) to a level image of `shape`, `factor` level px per mask px."""
    up = np.repeat(np.repeat(mask, factor, axis=0), factor, axis=1)
    return up[: shape[0], : shape[1]]


def test_svs_is_an_aperio_pyramid(positive_svs):
    path, _, _ = positive_svs
    slide = TiffSlide(path)
    assert slide.properties["tiffslide.vendor"] == "aperio"
    assert slide.level_count == 3
    assert slide.level_dimensions == ((8192, 6144), (2048, 1536), (512, 384))
    assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
    assert float(slide.properties["tiffslide.objective-power"]) == pytest.approx(40)
    assert {"thumbnail", "label", "macro"} <= set(slide.associated_images)
    assert slide.read_region((0, 0), 0, (256, 256), as_array=True).shape == (256, 256, 3)


def test_tiff_is_a_generic_pyramid_with_resolution(negative_tiff):
    path, _, _ = negative_tiff
    slide = TiffSlide(path)
    assert slide.properties["tiffslide.vendor"] is None
    assert slide.level_count >= 3
    assert slide.level_dimensions == ((4352, 2304), (1088, 576), (272, 144))
    assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(0.5)
    assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(0.5)


@pytest.mark.parametrize("fmt", ["svs", "tiff"])
def test_no_mpp_means_no_mpp_property(tmp_path, fmt):
    path = tmp_path / f"nompp.{fmt}"
    write_slide(path, SlideSpec(*SMALL, mpp=None, fmt=fmt, seed=3))
    slide = TiffSlide(path)
    assert slide.properties.get("tiffslide.mpp-x") is None
    assert slide.properties.get("tiffslide.mpp-y") is None
    assert slide.level_count == 2


def test_colours_round_trip_through_jpeg(positive_svs):
    path, spec, truth = positive_svs
    model = _SlideModel(spec)
    slide = TiffSlide(path)
    ys, xs = np.nonzero(truth.tissue_mask)
    x0, y0 = int(xs.mean()) * MASK_DOWNSAMPLE // 256 * 256, int(ys.mean()) * MASK_DOWNSAMPLE // 256 * 256
    expected = model._render(x0, y0, 512, 256, 1).astype(float)
    got = slide.read_region((x0, y0), 0, (512, 256), as_array=True)[..., :3].astype(float)
    assert np.abs(expected.mean((0, 1)) - got.mean((0, 1))).max() < 3  # no colour-space mix-up
    assert np.abs(expected - got).mean() < 8


def test_levels_agree(positive_svs):
    path, _, truth = positive_svs
    slide = TiffSlide(path)
    boundary = truth.tumour_mask & ~np.roll(truth.tumour_mask, 8, axis=1)  # tumour edge: tissue of both kinds
    ys, xs = np.nonzero(boundary)
    cx, cy = int(np.median(xs)) * MASK_DOWNSAMPLE, int(np.median(ys)) * MASK_DOWNSAMPLE
    x0, y0 = max(0, cx - 1024), max(0, cy - 1024)
    level0 = slide.read_region((x0, y0), 0, (2048, 2048)).convert("RGB")
    level1 = np.asarray(slide.read_region((x0, y0), 1, (512, 512)).convert("RGB"), float)
    shrunk = np.asarray(level0.resize((512, 512), Image.BOX), float)
    assert np.abs(level1 - shrunk).mean() < 15
    level2 = np.asarray(slide.read_region((x0, y0), 2, (128, 128)).convert("RGB"), float)
    shrunk2 = np.asarray(level0.resize((128, 128), Image.BOX), float)
    assert np.abs(level2 - shrunk2).mean() < 15


def test_deterministic_bytes(tmp_path):
    spec = SlideSpec(*SMALL, positive=True, pen_marks=True, faint_tissue=True, seed=7)
    a, b, c = tmp_path / "a.svs", tmp_path / "b.svs", tmp_path / "c.svs"
    truth_a = write_slide(a, spec)
    truth_b = write_slide(b, spec)
    write_slide(c, SlideSpec(*SMALL, positive=True, pen_marks=True, faint_tissue=True, seed=8))
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)
    assert np.array_equal(truth_a.tumour_mask, truth_b.tumour_mask)
    assert np.array_equal(truth_a.tissue_mask, truth_b.tissue_mask)


def test_truth_masks(positive_svs, negative_tiff):
    _, _, pos = positive_svs
    _, _, neg = negative_tiff
    for truth, (w, h) in ((pos, SIZES["tiny"]), (neg, (4352, 2304))):
        assert truth.mask_downsample == MASK_DOWNSAMPLE
        assert (
            truth.tissue_mask.shape == truth.tumour_mask.shape == (h // MASK_DOWNSAMPLE, w // MASK_DOWNSAMPLE)
        )
        assert truth.tissue_mask.dtype == bool
    assert pos.tumour_mask.any() and not (pos.tumour_mask & ~pos.tissue_mask).any()
    assert 0.08 < pos.tumour_mask.sum() / pos.tissue_mask.sum() < 0.35
    assert not neg.tumour_mask.any()


@pytest.mark.parametrize("seed", range(4))
def test_tissue_fraction(seed):
    n_pieces = 1 + seed % 4
    truth = _SlideModel(SlideSpec(*SIZES["tiny"], n_pieces=n_pieces, positive=True, seed=seed)).truth
    assert 0.15 < truth.tissue_mask.mean() < 0.7
    assert 0.08 < truth.tumour_mask.sum() / truth.tissue_mask.sum() < 0.35


def test_tumour_looks_different(positive_svs):
    path, _, truth = positive_svs
    slide = TiffSlide(path)
    rgb = _level_rgb(slide, 1).astype(float)
    factor = MASK_DOWNSAMPLE // 4
    model = _SlideModel(positive_svs[1])
    normal_piece = model.fields[model.index["tissue"]] > 200  # away from edges; excludes the faint piece
    tumour = _mask_at(truth.tumour_mask & normal_piece, factor, rgb.shape[:2])
    stroma = _mask_at(normal_piece & ~truth.tumour_mask, factor, rgb.shape[:2])
    tumour_rgb, stroma_rgb = rgb[tumour].mean(0), rgb[stroma].mean(0)
    assert stroma_rgb.mean() - tumour_rgb.mean() > 20  # darker
    # more haematoxylin: blue relative to red goes up
    assert tumour_rgb[2] / tumour_rgb[0] - stroma_rgb[2] / stroma_rgb[0] > 0.05
    # tissue is clearly off-white and pink-purple, glass is near white
    glass = _mask_at(~truth.tissue_mask, factor, rgb.shape[:2])
    glass_rgb = np.median(rgb[glass], axis=0)
    assert np.all(glass_rgb > 232)
    assert stroma_rgb[0] > stroma_rgb[1] + 30  # eosin: red/pink over green


def test_blank_slide_is_glass(tmp_path):
    path = tmp_path / "blank.svs"
    truth = write_slide(path, SlideSpec(*SMALL, n_pieces=0, positive=True, seed=4))
    assert not truth.tissue_mask.any() and not truth.tumour_mask.any()
    rgb = _level_rgb(TiffSlide(path), 0).astype(float)
    assert abs(rgb.mean() - 240) < 4
    assert rgb.std() < 3


def test_pen_and_faint_tissue(positive_svs):
    path, spec, truth = positive_svs
    rgb = _level_rgb(TiffSlide(path), 2).astype(float)
    glass = _mask_at(~truth.tissue_mask, MASK_DOWNSAMPLE // 16, rgb.shape[:2])
    assert (rgb[glass].min(axis=1) < 120).sum() > 100  # ink on glass
    model = _SlideModel(spec)
    faint = _mask_at(model.fields[model.index["faint"]] > 100, MASK_DOWNSAMPLE // 16, rgb.shape[:2])
    assert faint.sum() > 100
    faint_rgb = rgb[faint].mean(0)
    saturation = (faint_rgb.max() - faint_rgb.min()) / faint_rgb.max()
    assert 0.01 < saturation < 0.08  # pale: easy to miss with a naive threshold
    assert truth.tissue_mask[model.fields[model.index["faint"]] > 0].all()


def _check_dataset(fs, root: str, ds, n: int, n_pos: int, fmt: str) -> None:
    assert len(ds.uris) == len(ds.slide_ids) == len(ds.labels) == n
    assert sum(ds.labels) == n_pos
    with fs.open(f"{root}/labels.csv", "r") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    assert list(rows[0]) == ["slide_id", "label", "patient_id", "site"]
    assert [r["slide_id"] for r in rows] == ds.slide_ids == [f"slide_{i:03d}" for i in range(n)]
    assert [int(r["label"]) for r in rows] == ds.labels
    assert [r["patient_id"] for r in rows] == [f"patient_{i // 2:03d}" for i in range(n)]
    assert [r["site"] for r in rows] == [f"site_{site}" for site in ds.sites]
    meta = json.loads(fs.cat_file(f"{root}/synth.json"))
    assert meta["fmt"] == fmt and meta["mask_downsample"] == MASK_DOWNSAMPLE and meta["mpp"] == 0.25
    assert [s["file"] for s in meta["slides"]] == [f"{i}.{fmt}" for i in ds.slide_ids]
    for slide_id, label in zip(ds.slide_ids, ds.labels, strict=True):
        assert fs.exists(f"{root}/{slide_id}.{fmt}")
        tumour = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{root}/masks/{slide_id}.tumour.png"))))
        tissue = np.asarray(Image.open(io.BytesIO(fs.cat_file(f"{root}/masks/{slide_id}.tissue.png"))))
        assert tumour.dtype == np.uint8 and set(np.unique(tissue)) <= {0, 255}
        assert tumour.shape == (SIZES["tiny"][1] // MASK_DOWNSAMPLE, SIZES["tiny"][0] // MASK_DOWNSAMPLE)
        assert (tumour.max() == 255) == bool(label)
        assert tissue.max() == 255


def test_write_dataset_local(tmp_path):
    ds = write_dataset(str(tmp_path / "ds"), n_slides=2, seed=3, positive_fraction=0.5)
    _check_dataset(fsspec.filesystem("file"), str(tmp_path / "ds"), ds, 2, 1, "svs")
    assert ds.labels_uri == str(tmp_path / "ds" / "labels.csv")
    slide = TiffSlide(ds.uris[0])
    assert slide.properties["tiffslide.vendor"] == "aperio"


def test_write_dataset_remote_filesystem():
    fs = fsspec.filesystem("memory")
    ds = write_dataset("memory://synth-test", n_slides=1, seed=5, fmt="tiff", positive_fraction=1.0)
    try:
        _check_dataset(fs, "/synth-test", ds, 1, 1, "tiff")
        assert ds.uris == ["memory://synth-test/slide_000.tiff"]
        assert ds.labels_uri == "memory://synth-test/labels.csv"
    finally:
        fs.rm("/synth-test", recursive=True)


# -- hard cohorts -------------------------------------------------------------------------------------------


def _tumour_against_tile_look(cohort) -> tuple[float, ...]:
    """Over whole-tissue tiles of positive slides: r(tumour fraction, mean grey), r(fraction, grey std)."""
    fraction, grey, spread = [], [], []
    for slide in cohort:
        tiles = sample_tiles(slide.spec, 40, 64, 2.0, seed=1, tumour_share=0.5)
        full = tiles.tissue_fraction == 1
        images = tiles.images[full].astype(np.float32).mean(axis=3).reshape(int(full.sum()), -1)
        fraction.append(tiles.tumour_fraction[full])
        grey.append(images.mean(axis=1))
        spread.append(images.std(axis=1))
    f = np.concatenate(fraction)
    return tuple(float(np.corrcoef(f, np.concatenate(look))[0, 1]) for look in (grey, spread))


def test_hard_tumour_differs_in_texture_not_in_darkness():
    """Easy tumour is darker (r ≈ -0.97 against tile brightness); hard tumour is as bright as the tissue
    around it and is found by its texture (smoother sheets of pale nuclei against fibres and clefts)."""
    easy = cohort_specs(6, seed=5, positive_fraction=1.0)
    hard = cohort_specs(6, seed=5, positive_fraction=1.0, difficulty="hard", tumour_cover=(0.1, 0.2))
    easy_grey, _ = _tumour_against_tile_look(easy)
    hard_grey, hard_spread = _tumour_against_tile_look(hard)
    assert easy_grey < -0.9
    assert abs(hard_grey) < 0.3, hard_grey
    assert hard_spread < -0.5, hard_spread


def test_hard_sites_stain_differently_and_do_not_follow_the_labels():
    cohort = cohort_specs(12, seed=2, difficulty="hard", sites=3)
    assert [slide.site for slide in cohort] == [i % 3 for i in range(12)]
    by_site: dict[int, set] = {}
    for slide in cohort:
        by_site.setdefault(slide.site, set()).add((slide.spec.staining.h_od, slide.spec.staining.e_od))
    vectors = [next(iter(v)) for v in by_site.values()]
    assert all(len(v) == 1 for v in by_site.values()) and len(set(vectors)) == 3  # one staining per site
    gains = [slide.spec.staining.h_gain for slide in cohort if slide.site == 0]
    assert len(set(gains)) == len(gains)  # each slide jitters its site's intensity
    for site in range(3):  # both classes at every site: colour cannot stand in for the label
        assert {slide.spec.positive for slide in cohort if slide.site == site} == {True, False}
    # slides' mean tissue colours spread further than an easy cohort's (one staining, a stain field)
    spread = {}
    for difficulty in ("easy", "hard"):
        specs = [s.spec for s in cohort_specs(12, seed=2, pen_marks=False, difficulty=difficulty)]
        looks = [sample_tiles(spec, 8, 64, 2.0, seed=0).images.mean(axis=(0, 1, 2)) for spec in specs]
        spread[difficulty] = float(np.linalg.norm(np.std(looks, axis=0)))
    assert spread["hard"] > 1.5 * spread["easy"], spread


def test_hard_dataset_has_small_tumours_and_names_sites(tmp_path):
    root = tmp_path / "hard"
    assert main(["synth", "--out", str(root), "--n-slides", "4", "--seed", "9", "--positive-fraction", "1",
                 "--difficulty", "hard", "--sites", "2", "--no-pen-marks"]) == 0  # fmt: skip
    meta = json.loads((root / "synth.json").read_text())
    assert meta["difficulty"] == "hard"
    with (root / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["site"] for row in rows] == ["site_0", "site_1", "site_0", "site_1"]
    for entry in meta["slides"]:
        assert 0.005 <= entry["tumour_cover"] <= 0.08 and set(entry["staining"]) == {
            "h_od", "e_od", "h_gain", "e_gain"}  # fmt: skip
        tumour = np.asarray(Image.open(root / "masks" / f"{entry['slide_id']}.tumour.png")) > 0
        tissue = np.asarray(Image.open(root / "masks" / f"{entry['slide_id']}.tissue.png")) > 0
        share = tumour.sum() / tissue.sum()
        assert tumour.any() and share < 0.1, (entry["slide_id"], share)  # a few % of tissue, or one focus


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tumour-cover", "0.2", "0.1"], "tumour cover 0.2 0.1: needs 0 < low <= high < 1"),
        (["--sites", "0"], "sites must be at least 1, not 0"),
    ],
)
def test_hard_knobs_that_cannot_work_are_refused(tmp_path, capsys, flags, message):
    argv = ["synth", "--out", str(tmp_path / "x"), "--n-slides", "2", "--difficulty", "hard", *flags]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SynthError):
        cohort_specs(2, difficulty="medium")
