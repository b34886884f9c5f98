"""Per-slide tissue QC picture: the planner's thumbnail with the tissue outline and the tiles taken.

Ingest draws it from the thumbnail it has already rendered to find the tissue (no second read of the
slide), so a pathologist can check tissue detection by eye. The counts also travel as PNG text, which
tests and reports read with `read_qc_info` instead of looking at the pixels.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngImageFile, PngInfo
from scipy import ndimage

CONTOUR_RGB = (0, 200, 0)
TILE_RGB = (30, 90, 255)
MAX_PX = 1024  # long side of the picture (the thumbnail is shrunk to it, never enlarged)
_CONTOUR_PX = 2
_FONT_PX = 12
_MARGIN_PX = 4
_MIN_WIDTH_PX = 320  # room for the caption below a very narrow thumbnail


def render_qc(
    rgb: np.ndarray,
    mask: np.ndarray | None,
    boxes: np.ndarray,
    caption: str,
    info: dict[str, str],
    max_px: int = MAX_PX,
) -> bytes:
    """PNG bytes: `rgb` (h, w, 3) shrunk to at most `max_px`, the outline of `mask` (bool (h, w), or None),
    one outline per box (n, 4) of (x0, y0, x1, y1) in `rgb` pixels, `caption` in a strip below (wrapped),
    and `info` as PNG text."""
    h, w = rgb.shape[:2]
    scale = min(1.0, max_px / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    picture = Image.fromarray(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8))
    if scale < 1.0:
        picture = picture.resize(size, Image.Resampling.BOX)
    draw = ImageDraw.Draw(picture)
    corners = np.rint(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale).astype(int)
    for x0, y0, x1, y1 in corners.tolist():
        draw.rectangle((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)), outline=TILE_RGB)
    if mask is not None:
        shown = Image.fromarray(mask.astype(bool)).resize(size, Image.Resampling.NEAREST)
        inside = np.asarray(shown, dtype=bool)
        outline = inside & ~ndimage.binary_erosion(inside, iterations=_CONTOUR_PX, border_value=0)
        picture.paste(CONTOUR_RGB, mask=Image.fromarray(outline))

    font = _font()
    width = max(size[0], _MIN_WIDTH_PX)
    lines = _wrap(caption, font, width - 2 * _MARGIN_PX)
    line_px = _FONT_PX + 3
    canvas = Image.new("RGB", (width, size[1] + len(lines) * line_px + 2 * _MARGIN_PX), "white")
    canvas.paste(picture, (0, 0))
    text = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        text.text((_MARGIN_PX, size[1] + _MARGIN_PX + i * line_px), line, fill="black", font=font)

    meta = PngInfo()
    for key, value in info.items():
        meta.add_itxt(key, value)  # international text: reasons may hold µ and other non-Latin-1 signs
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", pnginfo=meta)
    return buffer.getvalue()


def read_qc_info(png: bytes) -> dict[str, str]:
    """The text metadata of a QC picture (`slide_id`, `n_tiles`, `status`, …)."""
    return dict(PngImageFile(io.BytesIO(png)).text)


@functools.cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib's files (a dependency; found without importing it), which has the µ
    and accented letters that reasons and slide names may hold and Pillow's built-in font lacks."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if path.is_file():
            return ImageFont.truetype(str(path), _FONT_PX)
    return ImageFont.load_default(_FONT_PX)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` (a longer single word stays whole)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines
