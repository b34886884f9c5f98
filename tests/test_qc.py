"""Per-slide tissue QC pictures: the drawing, and the pictures a real ingest writes beside the ledger."""

from __future__ import annotations

import io
import shutil

import numpy as np
from PIL import Image

from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.qc import CONTOUR_RGB, TILE_RGB, read_qc_info, render_qc
from slidestream.pipelines.synthetic import SlideSpec, write_slide
from slidestream.testing.helpers import make_config


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _has(pixels: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((pixels == rgb).all(axis=-1).any())


def test_render_draws_outline_tiles_and_metadata():
    rgb = np.full((1536, 2048, 3), 230, np.uint8)  # shrunk by 2 to the 1024-px long side
    mask = np.zeros((1536, 2048), bool)
    mask[400:1200, 400:1600] = True
    boxes = np.array([[600, 600, 664, 664], [664, 600, 728, 664]], float)  # thumbnail pixels
    info = {"slide_id": "s1", "n_tiles": "2", "status": "ok"}
    png = render_qc(rgb, mask, boxes, "s1 · 2 tiles · tissue 31.2% of the thumbnail", info)

    assert read_qc_info(png) == info
    pixels = _pixels(png)
    assert pixels.shape[1] == 1024 and pixels.shape[0] > 768  # the thumbnail plus the caption strip
    tile = (pixels == TILE_RGB).all(axis=-1)
    assert tile[300, 300:364].all() and tile[300:332, 300].all()  # the first box's top and left edges
    assert not tile[316, 316] and not tile[:250].any() and not tile[400:].any()  # inside, far away
    contour = (pixels == CONTOUR_RGB).all(axis=-1)
    assert contour[200, 400] and contour[400, 200] and not contour[400, 400] and not contour[50, 50]
    assert not _has(pixels[768:], CONTOUR_RGB)  # the caption strip is text only


def test_ingest_writes_a_picture_per_slide_and_keeps_it_in_step(ray_local, slide_root, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(slide_root / "slide_000.svs", slides / "a.svs")
    shutil.copy(slide_root / "slide_001.svs", slides / "b.svs")
    write_slide(slides / "blank.svs", SlideSpec(8192, 6144, n_pieces=0, seed=4))
    write_slide(slides / "no_mpp.tiff", SlideSpec(8192, 6144, mpp=None, fmt="tiff", seed=3))
    (slides / "notes.svs").write_text("a text file, not a slide\n")
    config = make_config()
    out = tmp_path / "out"
    report = run_ingest(str(slides), str(out), config)
    assert sorted(report.ok) == ["a", "b"] and set(report.failed) == {"blank", "no_mpp", "notes"}

    qc = out / "qc" / config.tiling.key
    assert report.stage.rsplit("/", 1)[-1] == config.tiling.key
    entries = {e.slide_id: e for e in Ledger(str(out)).entries(report.stage)}
    for sid in ("a", "b"):
        png = (qc / f"{sid}.png").read_bytes()
        info = read_qc_info(png)
        assert info == {"slide_id": sid, "n_tiles": str(entries[sid].n_tiles), "status": "ok"}
        assert entries[sid].n_tiles > 0
        pixels = _pixels(png)
        assert _has(pixels, TILE_RGB) and _has(pixels, CONTOUR_RGB)
    for sid in ("blank", "no_mpp"):  # failed, but there is a thumbnail to show why
        info = read_qc_info((qc / f"{sid}.png").read_bytes())
        assert (info["status"], info["n_tiles"]) == ("failed", "0")
    assert not _has(_pixels((qc / "blank.png").read_bytes()), TILE_RGB)
    assert not (qc / "notes.png").exists()  # nothing to draw

    # Rerun: a changed slide gets a new picture, one that no longer opens loses its old one, and the
    # unchanged slides are skipped and keep theirs.
    kept = {sid: (qc / f"{sid}.png").stat().st_mtime_ns for sid in ("blank", "no_mpp")}
    old_a = (qc / "a.png").read_bytes()
    shutil.copy(slide_root / "slide_002.svs", slides / "a.svs")
    (slides / "b.svs").write_text("no longer a slide\n")
    again = run_ingest(str(slides), str(out), config)
    assert again.ok == ["a"] and set(again.failed) == {"b"}, again.summary()
    entry = next(e for e in Ledger(str(out)).entries(report.stage) if e.slide_id == "a")
    new_a = (qc / "a.png").read_bytes()
    assert new_a != old_a and read_qc_info(new_a)["n_tiles"] == str(entry.n_tiles)
    assert not (qc / "b.png").exists()
    assert {sid: (qc / f"{sid}.png").stat().st_mtime_ns for sid in kept} == kept
    assert sorted(p.name for p in qc.iterdir()) == ["a.png", "blank.png", "no_mpp.png"]
