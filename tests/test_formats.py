"""Every slide format we can write is read by the backend its content asks for, and gives the tiles of
the same slide in SVS: on local disk and on the S3 server, with the same mpp and grid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from slidestream.cluster.config import TilingConfig
from slidestream.cluster.storage import filesystem
from slidestream.pipelines.formats.choose import detect_backend, open_handle
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.reader import read_tiles
from slidestream.pipelines.shards import decode_sample
from slidestream.pipelines.slides import discover_slides
from slidestream.pipelines.synthetic import SlideSpec, write_slide
from slidestream.pipelines.tiling import read_plan
from slidestream.testing.fetched import s3_fetches
from slidestream.testing.helpers import committed_samples, make_config

SPEC = SlideSpec(8192, 6144, seed=21, n_pieces=3)
# slide id → (how it is written, the backend that must read it)
SLIDES = {"ref": "svs", "ome": "ome-tiff", "ndpi": "ndpi", "dcm": "dicom"}
BACKENDS = {
    "ref": "tiffslide",
    "ome": "tiffslide",
    "ndpi": "tiffslide",
    "dcm": "wsidicom",
    "misnamed": "wsidicom",
}
JPEG_TOLERANCE = 2.0  # mean absolute difference per channel value after the shards' own JPEG round trip


@pytest.fixture(scope="module")
def format_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One slide written as SVS, OME-TIFF, Hamamatsu NDPI and a DICOM-WSI series, plus the DICOM base-level
    instance on its own under a TIFF name (`misnamed.tiff`) and a text file calling itself MRXS."""
    root = tmp_path_factory.mktemp("formats")
    write_slide(root / "ref.svs", SPEC)
    write_slide(root / "ome.ome.tiff", SlideSpec(**{**SPEC.__dict__, "fmt": "ome-tiff"}))
    write_slide(root / "ndpi.ndpi", SlideSpec(**{**SPEC.__dict__, "fmt": "ndpi"}))
    write_slide(root / "dcm", SlideSpec(**{**SPEC.__dict__, "fmt": "dicom"}))
    shutil.copy(root / "dcm" / "level_0.dcm", root / "misnamed.tiff")
    (root / "fake.mrxs").write_text("[GENERAL]\nnot really a MIRAX slide\n")
    return root


def _tiles(out: str) -> dict[str, dict[tuple[int, int], np.ndarray]]:
    """slide id → level-0 (x, y) → decoded tile, of every committed tile."""
    found: dict[str, dict[tuple[int, int], np.ndarray]] = {}
    for sample in committed_samples(out, make_config()).values():
        meta = json.loads(sample["json"])
        found.setdefault(meta["slide_id"], {})[(meta["x"], meta["y"])] = decode_sample(sample).astype(float)
    return found


def _assert_same_slide(
    sid: str, tiles: dict[tuple[int, int], np.ndarray], ref: dict[tuple[int, int], np.ndarray]
) -> None:
    """Same grid and pixels. `misnamed` holds the base level only: its tissue is found on a thumbnail
    reduced from level 0 instead of read from a level, so a tile or two at the threshold may differ."""
    shared = tiles.keys() & ref.keys()
    if sid == "misnamed":
        assert len(shared) >= 0.95 * len(tiles.keys() | ref.keys()), f"{sid}: grid differs from the SVS"
    else:
        assert tiles.keys() == ref.keys(), f"{sid}: tiles {sorted(tiles.keys() ^ ref.keys())} differ"
    diff = np.mean([np.abs(tiles[k] - ref[k]).mean() for k in shared])
    assert diff <= JPEG_TOLERANCE, f"{sid}: mean pixel difference {diff:.2f} to the SVS tiles"


def test_content_decides_the_backend(format_root: Path) -> None:
    for name, backend in BACKENDS.items():
        path = next(format_root.glob(f"{name}*"))
        assert detect_backend(str(path)) == backend, name
    for name in SLIDES:
        with open_handle(str(next(format_root.glob(f"{name}*")))) as slide:
            assert slide.mpp == pytest.approx(0.25)  # Aperio MPP, OME PhysicalSizeX, DICOM PixelSpacing
            assert slide.level_dimensions == ((8192, 6144), (2048, 1536), (512, 384))


def test_ventana_bif_mpp_comes_from_its_iscan_xmp(tmp_path: Path) -> None:
    """A TIFF with the markers Ventana scanners write (ScanOutputManager software, an `iScan` XMP element)
    and no resolution tags: its mpp is the XMP's ScanRes, as OpenSlide reads it."""
    xmp = b'<?xml version="1.0"?><Metadata><iScan Magnification="40" ScanRes="0.2325"/></Metadata>'
    path = tmp_path / "scan.bif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(
            np.full((512, 768, 3), 200, np.uint8),
            tile=(256, 256),
            photometric="rgb",
            compression="jpeg",
            software="ScanOutputManager 1.1.0.15854",
            description="level=0 mag=40 quality=90",
            extratags=[(700, "B", len(xmp), xmp, True)],
            metadata=None,
        )
    with pytest.warns(UserWarning, match="ventana"), open_handle(str(path)) as slide:
        assert slide.backend == "tiffslide" and slide.vendor == "ventana"
        assert slide.mpp == pytest.approx(0.2325)


def test_hamamatsu_ndpi_levels_mpp_and_batched_reads_under_any_name(tmp_path: Path) -> None:
    """The NDPI dialect: 64-bit IFD links, one restart-marked JPEG strip per level (read in McuStarts
    pieces), mpp in centimetre resolution tags, a macro photo that is not a level. A copy under a TIFF name
    reads the same, and the batched reader gives `read_region`'s pixels."""
    spec = SlideSpec(2048, 1536, seed=5, n_pieces=1, mpp=0.2265, fmt="ndpi")
    write_slide(tmp_path / "scan.ndpi", spec)
    shutil.copy(tmp_path / "scan.ndpi", tmp_path / "scan.tif")
    xs, ys = [0, 640, 1024, 1792], [0, 256, 768, 1280]
    for name in ("scan.ndpi", "scan.tif"):
        with pytest.warns(UserWarning, match="hamamatsu"), open_handle(str(tmp_path / name)) as slide:
            assert slide.backend == "tiffslide" and slide.vendor == "hamamatsu", name
            assert slide.mpp == pytest.approx(0.2265), name
            assert slide.level_dimensions == ((2048, 1536), (512, 384)), name
            batched = list(slide.read_regions(xs, ys, 0, 256))
            for x, y, region in zip(xs, ys, batched, strict=True):
                np.testing.assert_array_equal(region, slide.read_region((x, y), 0, (256, 256)))


def test_every_format_ingests_to_the_svs_tiles_locally_and_from_s3(
    ray_local, s3_server, format_root: Path, tmp_path: Path
) -> None:
    found = discover_slides(str(format_root), make_config().ingest.slide_extensions)
    assert sorted(s.slide_id for s in found.slides) == ["dcm", "fake", "misnamed", "ndpi", "ome", "ref"]
    assert not found.ignored, "the DICOM instances are one slide, not ignored files"

    local_out = str(tmp_path / "out")
    report = run_ingest(str(format_root), local_out, make_config())
    assert sorted(report.ok) == ["dcm", "misnamed", "ndpi", "ome", "ref"], report.summary()
    assert "fake" in report.failed and "openslide" in report.failed["fake"].lower()
    entries = {e.slide_id: e for e in Ledger(local_out).entries(report.stage)}
    assert {sid: entries[sid].backend for sid in BACKENDS} == BACKENDS
    assert all(entries[sid].mpp == pytest.approx(0.25) for sid in BACKENDS)
    local = _tiles(local_out)
    assert len(local["ref"]) > 20
    for sid in ("ome", "ndpi", "dcm", "misnamed"):
        _assert_same_slide(sid, local[sid], local["ref"])

    s3_server.make_bucket("formats-in")
    s3_server.make_bucket("formats-out")
    fs, _ = filesystem("s3://formats-in")
    for path in sorted(format_root.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"formats-in/cohort/{path.relative_to(format_root).as_posix()}")
    s3_report = run_ingest("s3://formats-in/cohort", "s3://formats-out/run", make_config())
    assert sorted(s3_report.ok) == sorted(report.ok), s3_report.summary()
    remote = _tiles("s3://formats-out/run")
    for sid in report.ok:
        _assert_same_slide(sid, remote[sid], local[sid])

    stage_entries = Ledger("s3://formats-out/run").entries(s3_report.stage)
    assert {e.slide_id: e.backend for e in stage_entries if e.status == "ok"} == BACKENDS


def test_dicom_on_s3_is_read_by_ranges(s3_server, format_root: Path) -> None:
    """Opening the series and reading tiles fetches a small part of its bytes, never whole instances."""
    s3_server.make_bucket("dicom-ranges")
    fs, _ = filesystem("s3://dicom-ranges")
    fs.put(str(format_root / "dcm"), "dicom-ranges/series", recursive=True)
    series_bytes = sum(p.stat().st_size for p in (format_root / "dcm").iterdir())
    assert len(list((format_root / "dcm").iterdir())) == 3  # one instance per level
    tiling = TilingConfig(mpp=0.5, tile_px=224)
    xs, ys = [2048, 2496, 4096, 4544, 6000, 1000], [2048, 2048, 3000, 3000, 1200, 4000]
    with s3_fetches() as fetched, open_handle("s3://dicom-ranges/series") as slide:
        assert slide.backend == "wsidicom" and slide.mpp == pytest.approx(0.25)
        opened = fetched.bytes
        plan = read_plan(slide.mpp, slide.level_downsamples, tiling)
        remote = list(read_tiles(slide, xs, ys, plan))
    per_tile = (fetched.bytes - opened) / len(xs)
    base_instance = (format_root / "dcm" / "level_0.dcm").stat().st_size
    assert fetched.largest <= 256 * 1024 < base_instance / 10, fetched  # ranges, never a whole instance
    assert opened < 0.05 * series_bytes and per_tile < 0.06 * series_bytes, (opened, per_tile, series_bytes)
    assert fetched.bytes < 0.35 * series_bytes, (fetched, series_bytes)
    with open_handle(str(format_root / "dcm")) as slide:
        np.testing.assert_array_equal(np.stack(remote), np.stack(list(read_tiles(slide, xs, ys, plan))))


def test_openslide_reads_what_tiffslide_reads_and_copies_remote_slides_to_scratch(
    s3_server, format_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    xs, ys = [2048, 4000], [2048, 3100]
    plan = read_plan(0.25, (1.0, 4.0, 16.0), TilingConfig(mpp=0.5, tile_px=256))
    with open_handle(str(format_root / "ref.svs")) as slide:
        expected = np.stack(list(read_tiles(slide, xs, ys, plan)))

    s3_server.make_bucket("openslide-in")
    fs, _ = filesystem("s3://openslide-in")
    fs.put_file(str(format_root / "ref.svs"), "openslide-in/ref.svs")
    scratch = tmp_path / "scratch"
    monkeypatch.setenv("SLIDESTREAM_SCRATCH", str(scratch))
    with open_handle("s3://openslide-in/ref.svs", backend="openslide") as slide:
        assert slide.backend == "openslide" and slide.mpp == pytest.approx(0.25)
        assert len(list(scratch.iterdir())) == 1  # the local copy OpenSlide reads
        np.testing.assert_array_equal(np.stack(list(read_tiles(slide, xs, ys, plan))), expected)
    assert not list(scratch.iterdir()), "the scratch copy outlived its handle"


_WITHOUT_OPENSLIDE = """
import json, sys
sys.modules["openslide"] = None  # as on an install without the extra
from slidestream.cluster.config import load_config
from slidestream.pipelines.ingest import plan_slide
from slidestream.pipelines.slides import discover_slides
config = load_config(None, [])
slides = discover_slides(sys.argv[1], config.ingest.slide_extensions).slides
(slide,) = [s for s in slides if s.slide_id == "fake"]
item = {"slide_id": slide.slide_id, "uri": slide.uri, "fingerprint": slide.fingerprint, "mpp_override": 0.0}
(row,) = plan_slide(item, config.tiling, config.tissue, config.shards)
print(json.dumps({"error": row["error"], "backend": row["backend"], "permanent": row["permanent"]}))
"""


def test_openslide_format_without_the_extra_fails_naming_it(format_root: Path) -> None:
    """What a read worker records for an MRXS slide on an install without OpenSlide."""
    env = {**os.environ, "SLIDESTREAM_PROGRESS": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_OPENSLIDE, str(format_root)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["backend"] == "openslide" and row["permanent"]
    assert "pip install 'slidestream[openslide]'" in row["error"], row


def test_an_mrxs_slide_owns_its_data_folder_and_a_changed_data_file_changes_its_fingerprint(tmp_path: Path):
    """Discovery only (OpenSlide reads the files): `case.mrxs` and `case/…` are one slide; a file with a
    slide suffix elsewhere is its own slide; a sidecar outside the data folder is ignored."""
    (tmp_path / "case" / "sub").mkdir(parents=True)
    (tmp_path / "case.mrxs").write_text("[GENERAL]\n")
    (tmp_path / "case" / "Slidedat.ini").write_text("[GENERAL]\n")
    (tmp_path / "case" / "Data0000.dat").write_bytes(b"\0" * 100)
    (tmp_path / "case" / "sub" / "Index.dat").write_bytes(b"\0" * 10)
    (tmp_path / "other.svs").write_bytes(b"II*\0")
    (tmp_path / "notes.txt").write_text("not a slide")
    extensions = make_config().ingest.slide_extensions
    found = discover_slides(str(tmp_path), extensions)
    assert [(s.slide_id, s.size) for s in found.slides] == [("case", 10 + 10 + 100 + 10), ("other", 4)]
    assert [Path(p).name for p in found.ignored] == ["notes.txt"]
    (tmp_path / "case" / "Data0000.dat").write_bytes(b"\1" * 101)
    changed = discover_slides(str(tmp_path), extensions).slides[0]
    assert changed.fingerprint != found.slides[0].fingerprint and changed.size == 10 + 10 + 101 + 10
