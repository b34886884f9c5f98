"""CDMA data: masks rasterised onto tiles (mask images, QuPath GeoJSON), the slide split, half-labelled
batches, augmentations, segmentation metrics and the GeoJSON written from a predicted mask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from slidestream.cluster.config import CDMAConfig
from slidestream.pipelines.annotations import AnnotationError, GeoJSONMask, MaskImage, Region, find_annotation
from slidestream.pipelines.labels import LabelsError
from slidestream.trainers.cdma.data import (
    TileSet,
    augment,
    half_batches,
    split_slides,
    steps_per_epoch,
    training_batch,
)
from slidestream.trainers.cdma.infer import mask_polygons
from slidestream.trainers.cdma.run import slide_sites
from slidestream.trainers.cdma.seg_metrics import segmentation_metrics
from slidestream.trainers.data import TrainDataError

CLASSES = ["background", "tumour"]


def _png(path: Path, mask: np.ndarray) -> str:
    Image.fromarray(mask.astype(np.uint8)).save(path)
    return str(path)


def test_mask_image_rasterised_onto_a_tile(tmp_path: Path) -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 3:6] = 255  # level-0 x 96..192, y 64..128 at downsample 32
    source = MaskImage(_png(tmp_path / "s.tumour.png", mask), 32, "s", 2)
    assert source.has_foreground()
    tile = source.region(Region(64, 64, 16, 16, 8.0))  # a 128-px level-0 tile at 16 px
    expected = np.zeros((16, 16), np.uint8)
    expected[0:8, 4:16] = 1
    np.testing.assert_array_equal(tile, expected)
    outside = source.region(Region(1000, 1000, 4, 4, 8.0))
    assert not outside.any()


def test_mask_image_with_bad_class_values_names_the_slide(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match=r"slide_7.*value 3"):
        MaskImage(_png(tmp_path / "m.png", np.array([[0, 3], [1, 0]])), 32, "slide_7", 2)


def _square(x0: float, y0: float, side: float) -> list[list[float]]:
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def test_geojson_polygons_with_holes_and_classes(tmp_path: Path) -> None:
    doc = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 64), _square(16, 16, 32)]},
                "properties": {"classification": {"name": "tumour"}},
            },
            {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [[_square(96, 0, 32)]]}},
        ],
    }
    (tmp_path / "s.geojson").write_text(json.dumps(doc))
    source = find_annotation(str(tmp_path), "s", ".tumour.png", 32, CLASSES)
    assert isinstance(source, GeoJSONMask) and source.has_foreground()
    grid = source.region(Region(0, 0, 16, 8, 8.0))
    assert grid[0:8, 0:2].all() and grid[0:2, 0:8].all()  # the ring
    assert not grid[3:5, 3:5].any()  # the hole
    assert grid[0:4, 12:16].all() and not grid[5:8, 12:16].any()  # the unclassified polygon = class 1
    doc["features"][0]["properties"]["classification"]["name"] = "stroma"
    (tmp_path / "s.geojson").write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match=r"s\.geojson feature 0.*'stroma'"):
        find_annotation(str(tmp_path), "s", ".tumour.png", 32, CLASSES)
    assert find_annotation(str(tmp_path), "other", ".tumour.png", 32, CLASSES) is None


def test_predicted_polygons_rasterise_back_to_the_mask(tmp_path: Path) -> None:
    mask = np.zeros((40, 50), np.uint8)
    yy, xx = np.mgrid[:40, :50]
    mask[(yy - 20) ** 2 + (xx - 18) ** 2 < 120] = 1
    mask[(yy - 20) ** 2 + (xx - 18) ** 2 < 12] = 0  # a hole
    mask[5:10, 35:45] = 1  # a second region
    doc = mask_polygons(mask, 32.0, CLASSES)
    assert len(doc["features"]) == 2
    assert all(f["properties"]["classification"]["name"] == "tumour" for f in doc["features"])
    assert max(len(f["geometry"]["coordinates"]) for f in doc["features"]) == 2  # outer ring + hole
    (tmp_path / "p.geojson").write_text(json.dumps(doc))
    back = GeoJSONMask(str(tmp_path / "p.geojson"), "p", CLASSES).region(Region(0, 0, 50, 40, 32.0))
    assert segmentation_metrics(back == 1, mask == 1)["dice"] > 0.95


def test_segmentation_metrics_by_hand() -> None:
    truth = np.zeros((20, 20), bool)
    truth[5:15, 5:15] = True
    pred = np.zeros((20, 20), bool)
    pred[5:15, 7:17] = True  # shifted two pixels right
    m = segmentation_metrics(pred, truth, spacing=2.0)
    assert m["dice"] == pytest.approx(2 * 80 / 200)
    assert m["jaccard"] == pytest.approx(80 / 120)
    assert m["hd95"] == pytest.approx(4.0)  # 2 px × 2 µm on the shifted edges
    assert 0 < m["asd"] < 4.0
    assert segmentation_metrics(truth, truth) == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    empty = segmentation_metrics(np.zeros_like(truth), truth)
    assert empty["dice"] == 0 and math.isnan(empty["hd95"])


def test_split_is_stratified_and_keeps_roles_apart() -> None:
    foreground = {f"s{i:02d}": i % 2 == 0 for i in range(12)}
    split = split_slides(foreground, ["u0", "u1", "u2"], 0.1, test_frac=0.2, val_slides=1, seed=0)
    assert len(split.test) == 2 and len(split.val) == 1 and len(split.labelled) == 1
    assert any(foreground[s] for s in split.test) and foreground[split.labelled[0]]
    roles = [split.labelled, split.unlabelled, split.val, split.test]
    everything = [s for role in roles for s in role]
    assert sorted(everything) == sorted([*foreground, "u0", "u1", "u2"])
    assert split_slides(foreground, ["u0", "u1", "u2"], 0.1, 0.2, 1, 0) == split
    small = split_slides({"a": True, "b": False, "c": True, "d": False}, [], 0.5, 0.25, 1, 0)
    assert len(small.test) == len(small.labelled) == len(small.val) == 1
    assert small.test[0] in "ac" and small.labelled[0] in "ac"  # foreground slides go where they teach
    with pytest.raises(TrainDataError, match="2 annotated slide"):
        split_slides({"a": True, "b": False}, [], 0.1, 0.5, 1, 0)


def test_foreground_first_labels_only_foreground_slides_while_there_are_any() -> None:
    foreground = {f"s{i:02d}": i % 2 == 0 for i in range(24)}
    stratified = split_slides(foreground, [], 0.1, test_frac=0.2, val_slides=1, seed=0)
    first = split_slides(foreground, [], 0.1, 0.2, 1, 0, labelled_slides="foreground")
    assert sorted(foreground[s] for s in stratified.labelled) == [False, True]  # 2 of a pool of 18
    assert len(first.labelled) == 2 and all(foreground[s] for s in first.labelled)
    assert first.test == stratified.test  # the held-out slides do not depend on the choice
    assert any(foreground[s] for s in first.val)
    assert not set(first.labelled) & set(first.unlabelled + first.val + first.test)
    assert sorted(first.labelled + first.unlabelled + first.val + first.test) == sorted(foreground)
    # more labelled slides than foreground ones: background-only slides fill the rest
    few = {"a": True, "b": True, "c": True, "d": False, "e": False, "f": False, "g": False, "h": False}
    filled = split_slides(few, [], 0.9, 0.125, 1, 0, labelled_slides="foreground")
    assert len(filled.labelled) == 5 and sum(few[s] for s in filled.labelled) == 2  # the third: a test slide


def test_sites_spread_the_labelled_slides_over_sites() -> None:
    foreground = {f"s{i:02d}": i % 2 == 0 for i in range(24)}
    site_of = {slide: f"site_{i // 8}" for i, slide in enumerate(sorted(foreground))}  # 3 sites, in blocks
    same_site_without = 0
    for seed in range(10):
        lone = split_slides(foreground, [], 0.1, 0.2, 1, seed, labelled_slides="foreground")
        spread = split_slides(foreground, [], 0.1, 0.2, 1, seed, "foreground", site_of)
        assert spread.test == lone.test and len(spread.labelled) == 2  # 10 % of a pool of 18
        assert all(foreground[s] for s in spread.labelled)
        assert len({site_of[s] for s in spread.labelled}) == 2, (seed, spread.labelled)
        same_site_without += len({site_of[s] for s in lone.labelled}) == 1
        roles = spread.labelled + spread.unlabelled + spread.val + spread.test
        assert sorted(roles) == sorted(foreground)
    assert same_site_without  # the seed's order alone labels two slides of one site for some seeds


def test_sites_come_from_a_labels_file_with_a_site_column(tmp_path: Path) -> None:
    with_sites, without = tmp_path / "labels.csv", tmp_path / "plain.csv"
    with_sites.write_text("slide_id,label,site\na,1,lab_A\nb,0,lab_B\nc,1,\n")
    without.write_text("slide_id,label\na,1\n")
    assert slide_sites(CDMAConfig(sites=str(with_sites))) == {"a": "lab_A", "b": "lab_B"}
    assert slide_sites(CDMAConfig()) is None
    with pytest.raises(LabelsError, match=r"plain\.csv has no site column \(it has slide_id, label\)"):
        slide_sites(CDMAConfig(sites=str(without)))


def test_an_epoch_is_one_labelled_pass_of_the_global_batch() -> None:
    # the official sampler: len(labelled) // 8 steps; with 2 workers a global step takes 2 × 8 labelled
    assert steps_per_epoch(100, 8, 1, None) == 12
    assert steps_per_epoch(100, 8, 2, None) == 6
    assert steps_per_epoch(5, 8, 1, None) == 1  # fewer labelled tiles than a batch: one (cycled) step
    assert steps_per_epoch(100, 8, 1, 40) == 40  # cdma.steps_per_epoch overrides
    steps = steps_per_epoch(20, 4, 2, None)
    epoch = [list(half_batches(20, 24, 4, steps, 0, 3, r, 2)) for r in range(2)]
    labelled = np.concatenate([lab for rank in epoch for lab, _ in rank])
    assert len(labelled) == len(set(labelled.tolist())) == 16  # permuted once, no tile twice
    assert not np.array_equal(epoch[0][0][1], epoch[1][0][1])  # each rank its own tiles
    again = list(half_batches(20, 24, 4, steps, 0, 3, 0, 2))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(again, epoch[0], strict=True))


def test_unlabelled_tiles_run_on_across_epochs() -> None:
    # 2 steps × 2 ranks × 4 = 16 unlabelled draws per epoch from 24 tiles: epoch 0 and the first step of
    # epoch 1 make one pass over all 24 (a restart each epoch would repeat some and miss others)
    steps = steps_per_epoch(20, 4, 2, None)
    unl = {(e, r): [u for _, u in half_batches(20, 24, 4, steps, 0, e, r, 2)] for e in (0, 1) for r in (0, 1)}
    first_pass = [*unl[0, 0], *unl[0, 1], unl[1, 0][0], unl[1, 1][0]]
    assert sorted(np.concatenate(first_pass).tolist()) == list(range(24))


def test_augment_moves_mask_with_image() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    y = x[:, 0].long()  # the mask equals channel 0, so any geometric change must match
    xa, ya = augment(x, y, gen, noise_std=0.0, noise_p=0.0)
    assert torch.equal(xa[:, 0].long(), ya)
    changed = [not torch.equal(augment(x, y, gen, 0.0, 0.0)[0], x) for _ in range(10)]
    assert any(changed)


def test_noise_is_added_to_the_unit_image_before_normalisation() -> None:
    grey = np.full((2, 16, 16, 3), 128, np.uint8)
    tiles = TileSet(grey, np.zeros((2, 16, 16), np.uint8), ["a", "b"])
    idx = np.arange(2)
    gen = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    clean, _ = training_batch(tiles, None, idx, idx, gen, 0.1, 0.0, device)
    noisy, masks = training_batch(tiles, tiles, idx, idx, gen, 0.1, 1.0, device)
    assert noisy.shape == (4, 3, 16, 16) and masks.shape == (2, 16, 16)
    # σ 0.1 on the [0, 1] image is σ 0.1 / std_c after normalisation (≈ 0.44, not 0.1)
    spread = (noisy - clean.repeat(2, 1, 1, 1)).std(dim=(0, 2, 3))
    assert spread.tolist() == pytest.approx([0.1 / 0.229, 0.1 / 0.224, 0.1 / 0.225], rel=0.05)
