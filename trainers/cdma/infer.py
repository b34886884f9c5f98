"""Slide-level segmentation: a sliding window over the slide's tissue, decoder 1's softmax averaged where
windows overlap, stitched into a class map on a level-0 grid of `downsample` px per cell; the map as a PNG
overlay on the slide thumbnail and as GeoJSON polygons (level-0 coordinates, QuPath's layout).

Memory stays bounded by the output grid (a few MB per slide at the default 32 level-0 px per cell), never
by the slide: windows are read in batches through the pipeline's tile reader.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from slidestream.cluster.config import TilingConfig, TissueConfig
from slidestream.cluster.storage import write_bytes_atomic
from slidestream.pipelines.formats.choose import open_handle
from slidestream.pipelines.formats.errors import SlideError
from slidestream.pipelines.reader import read_tiles, slide_info
from slidestream.pipelines.tiling import grid_positions, read_plan
from slidestream.trainers.cdma.data import normalise

__all__ = ["SlidePrediction", "mask_polygons", "predict_slide", "write_geojson", "write_overlay"]

_COLOURS = np.array(
    [[0, 0, 0], [230, 40, 40], [40, 120, 230], [40, 200, 80], [240, 200, 30], [170, 60, 200]], np.uint8
)
_ALPHA = 0.45


@dataclass
class SlidePrediction:
    mask: np.ndarray  # uint8 (h, w) class per grid cell; 0 outside the windows
    probs: np.ndarray  # float32 (C, h, w) mean softmax; 0 outside the windows
    downsample: float  # level-0 px per grid cell
    slide_mpp: float
    windows: int


def _windows(uri: str, tiling: TilingConfig, tissue: TissueConfig, overlap: float) -> tuple:
    from slidestream.pipelines.tissue import tissue_mask

    handle = open_handle(uri)
    info = slide_info(handle, tiling.mpp_override)
    if info.mpp is None:
        raise SlideError(f"slide {uri}: no mpp (µm/px) in its metadata; set tiling.mpp_override")
    plan = read_plan(info.mpp, info.level_downsamples, tiling)
    step = tiling.model_copy(update={"overlap_px": min(tiling.tile_px - 1, round(tiling.tile_px * overlap))})
    xs, ys = grid_positions(info.width, info.height, plan, step)
    keep = tissue_mask(handle, info.mpp, tissue).fractions(xs, ys, plan.side0) > 0
    return handle, info, plan, xs[keep], ys[keep]


def _batches(items: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch: list[np.ndarray] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


@torch.no_grad()
def predict_slide(
    model: nn.Module,
    uri: str,
    tiling: TilingConfig,
    tissue: TissueConfig,
    downsample: float,
    overlap: float = 0.25,
    batch_size: int = 16,
    device: torch.device | None = None,
) -> SlidePrediction:
    """Decoder 1's prediction over the tissue of slide `uri` (windows of `tiling.tile_px` at `tiling.mpp`)."""
    device = device or torch.device("cpu")
    model.eval()
    handle, info, plan, xs, ys = _windows(uri, tiling, tissue, overlap)
    h, w = math.ceil(info.height / downsample), math.ceil(info.width / downsample)
    n_classes: int | None = None
    acc: np.ndarray | None = None
    counts: np.ndarray | None = None
    cell = max(1, round(plan.side0 / downsample))  # grid cells per window side
    done = 0
    with handle:
        for batch in _batches(read_tiles(handle, xs.tolist(), ys.tolist(), plan), batch_size):
            x = normalise(batch, device)
            with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext():
                logits = model(x)
            probs = F.adaptive_avg_pool2d(torch.softmax(logits.float(), dim=1), cell).cpu().numpy()
            if acc is None or counts is None:
                n_classes = probs.shape[1]
                acc = np.zeros((n_classes, h + cell, w + cell), np.float32)
                counts = np.zeros((h + cell, w + cell), np.float32)
            for k, p in enumerate(probs):
                r = int(ys[done + k] // downsample)
                c = int(xs[done + k] // downsample)
                acc[:, r : r + cell, c : c + cell] += p
                counts[r : r + cell, c : c + cell] += 1
            done += len(probs)
    if acc is None or counts is None:
        raise SlideError(f"slide {uri}: no tissue found for the sliding window")
    acc, counts = acc[:, :h, :w], counts[:h, :w]
    covered = counts > 0
    probs = np.where(covered, acc / np.maximum(counts, 1), 0).astype(np.float32)
    mask = np.where(covered, probs.argmax(0), 0).astype(np.uint8)
    return SlidePrediction(mask, probs, float(downsample), float(info.mpp), done)


def write_overlay(
    slide_uri: str, mask: np.ndarray, downsample: float, out_uri: str, max_px: int = 1024
) -> None:
    """The class map over the slide thumbnail (each class its colour, semi-transparent), as a PNG."""
    from slidestream.trainers.viz import slide_thumbnail

    thumb, thumb_ds = slide_thumbnail(slide_uri, max_px)
    image = np.asarray(thumb.convert("RGB"), np.float32)
    th, tw = image.shape[:2]
    rows = np.clip((np.arange(th) + 0.5) * thumb_ds / downsample, 0, mask.shape[0] - 1).astype(int)
    cols = np.clip((np.arange(tw) + 0.5) * thumb_ds / downsample, 0, mask.shape[1] - 1).astype(int)
    classes = mask[rows][:, cols]
    colour = _COLOURS[classes % len(_COLOURS)].astype(np.float32)
    alpha = np.where(classes > 0, _ALPHA, 0.0)[..., None]
    blended = (image * (1 - alpha) + colour * alpha).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blended).save(buffer, format="PNG")
    write_bytes_atomic(out_uri, buffer.getvalue())


def mask_polygons(mask: np.ndarray, downsample: float, classes: list[str]) -> dict:
    """A GeoJSON FeatureCollection: one Polygon per connected region of each foreground class (outer ring
    plus its holes), in level-0 pixel coordinates, classified by class name as QuPath exports them."""
    from skimage import measure

    features = []
    for label in range(1, len(classes)):
        regions = measure.label(mask == label, connectivity=2)
        for region in measure.regionprops(regions):
            r0, c0, r1, c1 = region.bbox
            padded = np.pad(regions[r0:r1, c0:c1] == region.label, 1).astype(np.float32)
            contours = measure.find_contours(padded, 0.5)
            if not contours:
                continue
            contours.sort(key=len, reverse=True)
            rings = []
            for contour in contours:
                xy = (
                    np.stack([(contour[:, 1] - 1 + c0 + 0.5), (contour[:, 0] - 1 + r0 + 0.5)], 1) * downsample
                )
                ring = np.round(xy, 1).tolist()
                if ring[0] != ring[-1]:
                    ring.append(ring[0])
                rings.append(ring)
            features.append(
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {"objectType": "annotation", "classification": {"name": classes[label]}},
                }
            )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(mask: np.ndarray, downsample: float, classes: list[str], out_uri: str) -> int:
    """Write `mask_polygons` to `out_uri`; returns the number of polygons."""
    doc = mask_polygons(mask, downsample, classes)
    write_bytes_atomic(out_uri, json.dumps(doc).encode())
    return len(doc["features"])
