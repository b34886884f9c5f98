"""The batched TIFF-tile reader returns exactly what tiffslide's read_region returns, locally and on S3."""

from __future__ import annotations

import numpy as np
import pytest
from tiffslide import TiffSlide

from slidestream.cluster.config import TilingConfig
from slidestream.cluster.storage import filesystem
from slidestream.pipelines.formats.choose import open_handle
from slidestream.pipelines.reader import read_tile, read_tiles
from slidestream.pipelines.regions import Rect, RegionReader, level_page, supports
from slidestream.pipelines.tiling import read_plan

CORNERS = [(0, 0), (512, 1024), (1100, 2333), (8192 - 600, 6144 - 600)]  # aligned, unaligned, at the edge


@pytest.mark.parametrize("level", [0, 1])
def test_region_reader_equals_read_region(slide_root, level):
    path = str(slide_root / "slide_002.svs")
    slide = TiffSlide(path)
    page = level_page(slide, level)
    assert supports(page)
    scale = slide.level_downsamples[level]
    rects = [Rect(int(x / scale), int(y / scale), 300 if level == 0 else 100) for x, y in CORNERS]
    got = list(RegionReader(path, page).read(rects, batch=3))
    for rect, region in zip(rects, got, strict=True):
        expected = slide.read_region(
            (int(rect.x * scale), int(rect.y * scale)), level, (rect.size, rect.size), as_array=True
        )
        np.testing.assert_array_equal(region, expected)


def test_read_tiles_equals_per_tile_read_on_s3(s3_server, slide_root):
    s3_server.make_bucket("regions")
    fs, _ = filesystem("s3://regions")
    fs.put_file(str(slide_root / "slide_001.svs"), "regions/slide_001.svs")
    uri = "s3://regions/slide_001.svs"
    slide = open_handle(uri)
    for tiling in (TilingConfig(mpp=0.5, tile_px=256), TilingConfig(mpp=1.0, tile_px=200)):
        plan = read_plan(0.25, slide.level_downsamples, tiling)
        xs, ys = [c[0] for c in CORNERS[:3]], [c[1] for c in CORNERS[:3]]
        fast = list(read_tiles(slide, xs, ys, plan))
        for x, y, tile in zip(xs, ys, fast, strict=True):
            np.testing.assert_array_equal(tile, read_tile(slide, x, y, plan))
