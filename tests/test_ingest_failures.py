"""One bad slide never stops a run: each is recorded as failed with a reason naming what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.slides import DiscoveryError, discover_slides
from slidestream.pipelines.synthetic import MASK_DOWNSAMPLE, SlideSpec, write_slide
from slidestream.testing.helpers import committed_samples, make_config

SIZE = (8192, 6144)


def _corrupt_one_tissue_tile(path: Path, tissue: np.ndarray) -> tuple[int, int]:
    """Overwrite the JPEG data of one level-0 TIFF tile that lies in tissue; returns its level-0 corner."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tile_w, tile_h = page.tilewidth, page.tilelength
        per_row = -(-page.imagewidth // tile_w)
        offsets, counts = page.dataoffsets, page.databytecounts
    ys, xs = np.nonzero(tissue)
    middle = len(xs) // 2
    x0, y0 = xs[middle] * MASK_DOWNSAMPLE, ys[middle] * MASK_DOWNSAMPLE
    index = (y0 // tile_h) * per_row + (x0 // tile_w)
    with open(path, "r+b") as handle:
        handle.seek(offsets[index] + 2)  # keep the SOI marker, destroy the rest
        handle.write(b"\x00\xff\x13" * ((counts[index] - 4) // 3))
    return x0, y0


@pytest.fixture()
def mixed_slides(slide_root, tmp_path) -> Path:
    root = tmp_path / "mixed"
    root.mkdir()
    shutil.copy(slide_root / "slide_000.svs", root / "good.svs")
    data = (slide_root / "slide_001.svs").read_bytes()
    (root / "truncated.svs").write_bytes(data[: len(data) // 3])
    (root / "notes.svs").write_text("this is a text file, not a slide\n")
    (root / "README.txt").write_text("ignored: not a slide extension\n")
    write_slide(root / "no_mpp.tiff", SlideSpec(*SIZE, mpp=None, fmt="tiff", seed=3))
    write_slide(root / "blank.svs", SlideSpec(*SIZE, n_pieces=0, seed=4))
    truth = write_slide(root / "bad_tile.svs", SlideSpec(*SIZE, seed=5))
    _corrupt_one_tissue_tile(root / "bad_tile.svs", truth.tissue_mask)
    return root


def test_bad_slides_are_recorded_and_the_run_finishes(ray_local, mixed_slides, tmp_path):
    config = make_config()
    out = str(tmp_path / "out")
    report = run_ingest(str(mixed_slides), out, config)
    assert report.ok == ["good"], report.summary()
    assert report.ignored_files == 1
    failed = report.failed
    assert set(failed) == {"truncated", "notes", "no_mpp", "blank", "bad_tile"}
    assert "cannot open as a slide" in failed["notes"]
    assert "no mpp" in failed["no_mpp"] and "--mpp-override" in failed["no_mpp"]
    assert "no tissue found" in failed["blank"]
    assert "unreadable tile region at level-0" in failed["bad_tile"]
    assert failed["truncated"]

    entries = {e.slide_id: e for e in Ledger(out).entries(report.stage)}
    assert entries["good"].status == "ok" and entries["good"].n_tiles > 0
    assert all(entries[s].status == "failed" and not entries[s].shards for s in failed)
    # Nothing of a failed slide is visible, and no file of it is left behind.
    assert {k.split("/")[0] for k in committed_samples(out, config)} == {"good"}
    stage_dir = Path(out) / report.stage
    assert all(p.name.startswith("shard-good-") for p in stage_dir.glob("shard-*"))

    # Permanent failures are not retried while the file is unchanged.
    again = run_ingest(str(mixed_slides), out, config)
    assert again.skipped_unchanged == 6 and not again.failed


def test_mpp_override_from_a_slide_list(ray_local, mixed_slides, tmp_path):
    slide_list = tmp_path / "slides.csv"
    slide_list.write_text(f"uri,mpp\n{mixed_slides / 'no_mpp.tiff'},0.25\n{mixed_slides / 'good.svs'},\n")
    report = run_ingest(str(slide_list), str(tmp_path / "out"), make_config())
    assert sorted(report.ok) == ["good", "no_mpp"], report.summary()


def test_slide_list_errors_name_the_line(tmp_path):
    missing_column = tmp_path / "a.csv"
    missing_column.write_text("path\nx.svs\n")
    with pytest.raises(DiscoveryError, match="needs a 'uri' column"):
        discover_slides(str(missing_column), [".svs"])
    bad_mpp = tmp_path / "b.csv"
    bad_mpp.write_text("uri,mpp\nx.svs,fast\n")
    with pytest.raises(DiscoveryError, match="line 2: mpp 'fast' is not a number"):
        discover_slides(str(bad_mpp), [".svs"])


def test_listed_but_missing_slide_is_failed_not_lost(ray_local, slide_root, tmp_path):
    slide_list = tmp_path / "slides.csv"
    slide_list.write_text(f"uri\n{slide_root / 'slide_000.svs'}\n{tmp_path / 'gone.svs'}\n")
    report = run_ingest(str(slide_list), str(tmp_path / "out"), make_config())
    assert report.ok == ["slide_000"]
    assert report.failed["gone"].startswith("slide not found")


def test_slide_id_clash_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "case 1.svs").write_bytes(b"x")
    (tmp_path / "b" / "case_1.svs").write_bytes(b"y")
    with pytest.raises(DiscoveryError, match="slide id 'case_1' is derived from both"):
        discover_slides(str(tmp_path), [".svs"])
