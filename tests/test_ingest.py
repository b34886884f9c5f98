"""Ingest on a real local Ray instance over real synthetic slides: geometry, tissue, ledger, reruns."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image
from tiffslide import TiffSlide

from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.synthetic import MASK_DOWNSAMPLE, SlideSpec, write_slide
from slidestream.testing.helpers import committed_samples, make_config


def test_ingest_writes_micrometre_exact_tiles(ray_local, slide_root, tmp_path):
    config = make_config()  # 0.25 µm/px slides tiled at 0.5 µm/px, 256 px
    out = str(tmp_path / "out")
    report = run_ingest(str(slide_root), out, config)
    assert sorted(report.ok) == ["slide_000", "slide_001", "slide_002", "slide_003"], report.summary()
    assert not report.failed
    samples = committed_samples(out, config)
    assert len(samples) == report.tiles > 40

    key, sample = next(iter(sorted(samples.items())))
    meta = json.loads(sample["json"])
    slide_id, xy = key.split("/")
    assert "." not in xy and meta["slide_id"] == slide_id
    assert (meta["mpp"], meta["tile_px"]) == (0.5, 256)
    assert meta["tile_px"] * meta["mpp"] == 128.0  # each tile covers 128 µm

    # The tile is the level-0 region of 512 × 512 px (128 µm at 0.25 µm/px), shrunk to 256 px.
    slide = TiffSlide(str(slide_root / f"{slide_id}.svs"))
    direct = slide.read_region((meta["x"], meta["y"]), 0, (512, 512), as_array=True)[..., :3]
    expected = np.asarray(Image.fromarray(direct).resize((256, 256), Image.BOX), dtype=np.float32)
    tile = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), dtype=np.float32)
    assert tile.shape == (256, 256, 3)
    assert np.abs(tile - expected).mean() < 4.0  # JPEG re-encoding only
    shifted = slide.read_region((meta["x"] + 256, meta["y"]), 0, (512, 512), as_array=True)[..., :3]
    shifted = np.asarray(Image.fromarray(shifted).resize((256, 256), Image.BOX), dtype=np.float32)
    assert np.abs(tile - shifted).mean() > 2 * np.abs(tile - expected).mean()


def test_tissue_free_regions_give_no_tiles(ray_local, slide_root, tmp_path):
    config = make_config()
    out = str(tmp_path / "out")
    run_ingest(str(slide_root), out, config)
    tissue = {
        sid: np.asarray(Image.open(slide_root / "masks" / f"{sid}.tissue.png")) > 0
        for sid in ("slide_000", "slide_001", "slide_002", "slide_003")
    }
    for key, sample in committed_samples(out, config).items():
        meta = json.loads(sample["json"])
        mask = tissue[key.split("/")[0]]
        x0, y0 = meta["x"] // MASK_DOWNSAMPLE, meta["y"] // MASK_DOWNSAMPLE
        window = mask[y0 : y0 + 512 // MASK_DOWNSAMPLE, x0 : x0 + 512 // MASK_DOWNSAMPLE]
        assert window.mean() > 0.05, f"{key} lies on glass (true tissue fraction {window.mean():.2f})"
        assert meta["tissue_frac"] >= config.tiling.min_tissue_frac


def test_rerun_skips_unchanged_and_reprocesses_changed(ray_local, slide_copy, tmp_path):
    config = make_config()
    out = str(tmp_path / "out")
    first = run_ingest(str(slide_copy), out, config)
    before = committed_samples(out, config)

    again = run_ingest(str(slide_copy), out, config)
    assert again.skipped_unchanged == 4 and not again.ok and not again.failed

    # Replace one slide with different content: it is reprocessed and its old shards disappear.
    write_slide(slide_copy / "slide_001.svs", SlideSpec(8192, 6144, seed=99, positive=True))
    changed = run_ingest(str(slide_copy), out, config)
    assert changed.ok == ["slide_001"] and changed.skipped_unchanged == 3
    after = committed_samples(out, config)
    assert {k for k in after if not k.startswith("slide_001/")} == {
        k for k in before if not k.startswith("slide_001/")
    }
    new_tiles = {(k, v["jpg"]) for k, v in after.items() if k.startswith("slide_001/")}
    assert new_tiles.isdisjoint({(k, v["jpg"]) for k, v in before.items() if k.startswith("slide_001/")})
    entry = next(e for e in Ledger(out).entries("tiles/mpp0.50_px256") if e.slide_id == "slide_001")
    stage_dir = tmp_path / "out" / "tiles" / "mpp0.50_px256"
    on_disk = sorted(p for p in os.listdir(stage_dir) if p.startswith("shard-"))
    referenced = sorted(n for e in Ledger(out).entries("tiles/mpp0.50_px256") for n in e.shards)
    assert on_disk == referenced, "superseded shards must be collected"
    assert entry.n_tiles == sum(1 for k in after if k.startswith("slide_001/"))
    assert first.tiles == len(before)


def test_other_tiling_keeps_its_own_outputs(ray_local, slide_root, tmp_path):
    out = str(tmp_path / "out")
    coarse = make_config("tiling.mpp=1.0", "tiling.tile_px=128")
    report = run_ingest(str(slide_root), out, coarse)
    assert report.stage == "tiles/mpp1.00_px128" and len(report.ok) == 4
    meta = json.loads(next(iter(committed_samples(out, coarse).values()))["json"])
    assert (meta["mpp"], meta["tile_px"]) == (1.0, 128)
    assert Ledger(out).entries("tiles/mpp0.50_px256") == []
