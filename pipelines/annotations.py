"""Segmentation annotations per slide, rasterised onto any level-0 region (a tile, or the whole slide).

Two sources, found in an annotation directory by slide id:
* `<slide_id><suffix>` (default `.tumour.png`): a mask image at a stated downsample (level-0 px per mask
  pixel), 0/255 for a binary mask or class indices 0…C−1 (what `slidestream.pipelines.synthetic` writes);
* `<slide_id>.geojson`: polygons in level-0 pixel coordinates (a QuPath export: a FeatureCollection of
  Polygon / MultiPolygon features, holes as inner rings); the class is `properties.classification.name`
  (index in the class list; class 0 is background), or class 1 when a feature has none.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.storage import exists, join, read_bytes

__all__ = ["AnnotationError", "GeoJSONMask", "MaskImage", "SlideAnnotation", "find_annotation"]


class AnnotationError(SlidestreamError, ValueError):
    """An annotation that cannot be used; the message names the slide and the file."""


@dataclass(frozen=True)
class Region:
    """`width`×`height` output pixels from level-0 (x0, y0), each covering `scale` level-0 pixels."""

    x0: float
    y0: float
    width: int
    height: int
    scale: float


class SlideAnnotation(ABC):
    @abstractmethod
    def region(self, region: Region) -> np.ndarray:
        """Class index per output pixel, uint8 (height, width); outside the annotation: 0."""

    @abstractmethod
    def has_foreground(self) -> bool:
        """Whether any pixel of the slide is annotated with a class other than background."""


class MaskImage(SlideAnnotation):
    """A mask image at `downsample` level-0 px per pixel, sampled at the output pixel centres."""

    def __init__(self, uri: str, downsample: float, slide_id: str, n_classes: int) -> None:
        try:
            image = Image.open(io.BytesIO(read_bytes(uri)))
            mask = np.asarray(image.convert("L") if image.mode not in ("L", "P", "1") else image)
        except Exception as exc:
            raise AnnotationError(f"slide {slide_id}: cannot read mask image {uri}: {exc}") from None
        mask = mask.astype(np.uint8)
        values = set(np.unique(mask).tolist())
        if values <= {0, 255}:
            mask = (mask > 0).astype(np.uint8)
        elif max(values) >= n_classes:
            raise AnnotationError(
                f"slide {slide_id}: mask image {uri} holds value {max(values)}, but there are only "
                f"{n_classes} classes (expected 0/255 or class indices)"
            )
        self.mask, self.downsample = mask, float(downsample)

    def has_foreground(self) -> bool:
        return bool(self.mask.any())

    def region(self, region: Region) -> np.ndarray:
        h, w = self.mask.shape
        cols = np.floor((region.x0 + (np.arange(region.width) + 0.5) * region.scale) / self.downsample)
        rows = np.floor((region.y0 + (np.arange(region.height) + 0.5) * region.scale) / self.downsample)
        cols, rows = cols.astype(np.int64), rows.astype(np.int64)
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        out = self.mask[np.clip(rows, 0, h - 1)][:, np.clip(cols, 0, w - 1)]
        return np.where(inside, out, 0).astype(np.uint8)


class GeoJSONMask(SlideAnnotation):
    """Polygons drawn in class order (later classes over earlier ones), inner rings cut back to 0."""

    def __init__(self, uri: str, slide_id: str, classes: list[str]) -> None:
        try:
            doc = json.loads(read_bytes(uri))
        except Exception as exc:
            raise AnnotationError(f"slide {slide_id}: cannot read GeoJSON {uri}: {exc}") from None
        features = doc.get("features", []) if isinstance(doc, dict) and "features" in doc else doc
        if isinstance(features, dict):
            features = [features]
        if not isinstance(features, list):
            raise AnnotationError(f"slide {slide_id}: {uri} is not a GeoJSON FeatureCollection")
        self.shapes: list[tuple[int, list[list[np.ndarray]]]] = []
        for i, feature in enumerate(features):
            self.shapes.append(self._parse(feature, i, uri, slide_id, classes))
        self.shapes.sort(key=lambda shape: shape[0])

    def has_foreground(self) -> bool:
        return any(label > 0 and polygons for label, polygons in self.shapes)

    @staticmethod
    def _parse(
        feature: Any, index: int, uri: str, slide_id: str, classes: list[str]
    ) -> tuple[int, list[list[np.ndarray]]]:
        where = f"slide {slide_id}: {uri} feature {index}"
        geometry = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            kind = geometry.get("type") if isinstance(geometry, dict) else None
            raise AnnotationError(f"{where}: geometry {kind!r} is not a Polygon or MultiPolygon")
        coords = geometry.get("coordinates") or []
        polygons = coords if geometry["type"] == "MultiPolygon" else [coords]
        try:
            rings = [[np.asarray(ring, dtype=np.float64)[:, :2] for ring in poly] for poly in polygons]
        except (ValueError, IndexError, TypeError) as exc:
            raise AnnotationError(f"{where}: bad coordinates ({exc})") from None
        props = feature.get("properties") or {}
        classification = props.get("classification") or {}
        name = classification.get("name") if isinstance(classification, dict) else classification
        if name is None:
            return 1, rings
        if name not in classes[1:]:
            raise AnnotationError(f"{where}: class {name!r} is not one of the classes {classes[1:]}")
        return classes.index(name), rings

    def region(self, region: Region) -> np.ndarray:
        from skimage.draw import polygon

        out = np.zeros((region.height, region.width), np.uint8)
        for label, polygons in self.shapes:
            for poly in polygons:
                for k, ring in enumerate(poly):
                    # output pixel i has its centre at level-0 x0 + (i + 0.5) * scale
                    cols = (ring[:, 0] - region.x0) / region.scale - 0.5
                    rows = (ring[:, 1] - region.y0) / region.scale - 0.5
                    rr, cc = polygon(rows, cols, out.shape)
                    out[rr, cc] = label if k == 0 else 0
        return out


def find_annotation(
    root: str, slide_id: str, suffix: str, downsample: float, classes: list[str]
) -> SlideAnnotation | None:
    """The slide's annotation under `root` (GeoJSON first, then the mask image), or None when it has none."""
    for name, make in (
        (f"{slide_id}.geojson", lambda uri: GeoJSONMask(uri, slide_id, classes)),
        (f"{slide_id}{suffix}", lambda uri: MaskImage(uri, downsample, slide_id, len(classes))),
    ):
        uri = join(root, name)
        if exists(uri):
            return make(uri)
    return None
