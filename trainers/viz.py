"""Pictures next to a run: attention heatmaps over slide thumbnails and training curves (PNG).

Everything draws on `matplotlib.figure.Figure` objects that pyplot never sees, rendered by the Agg canvas,
so nothing depends on a display and no figure outlives its call (hundreds of slides leak nothing).
PNGs go to local paths or object storage through `slidestream.cluster.storage.write_bytes_atomic`.

Thumbnails never read level 0 of a pyramid whole: the smallest level that still gives `max_px` pixels is
read in horizontal bands of bounded size and box-filtered down, so memory stays bounded even for a slide
without a pyramid. Thumbnail pixel (i, j) covers level-0 pixels [j·d, (j+1)·d) × [i·d, (i+1)·d), d being
the returned downsample, which is what places tiles on the heatmap.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from slidestream.cluster.storage import write_bytes_atomic
from slidestream.pipelines.formats.choose import open_handle
from slidestream.pipelines.formats.errors import SlideError
from slidestream.pipelines.formats.handle import SlideHandle
from slidestream.pipelines.reader import slide_info

__all__ = [
    "attention_heatmap",
    "rank_normalise",
    "round_metrics",
    "slide_heatmap",
    "slide_thumbnail",
    "sweep_plot",
    "training_curves",
]

CMAP = "viridis"  # perceptually uniform, readable by colour-blind viewers, distinct from H&E pinks
ALPHA = 0.55  # overlay opacity: tissue stays visible under the colour
_BAND_PIXELS = 16 * 1024 * 1024  # at most this many level pixels are decoded at once for a thumbnail
_DPI = 100


# --------------------------------------------------------------------------------------------------------
# thumbnails


def _level0_row(row: int, downsample: float) -> int:
    """A level-0 y that slide reader maps back to exactly `row` of a level (readers truncate)."""
    y = math.ceil(row * downsample)
    while y > 0 and int((y - 1) / downsample) >= row:
        y -= 1
    while int(y / downsample) < row:
        y += 1
    return y


def _thumbnail(slide: SlideHandle, max_px: int) -> tuple[Image.Image, float]:
    w0, h0 = slide.dimensions
    level = slide.get_best_level_for_downsample(max(w0, h0) / max_px)
    lw, lh = slide.level_dimensions[level]
    level_ds = float(slide.level_downsamples[level])
    f = max(1.0, max(lw, lh) / max_px)  # level px per thumbnail px
    tw = max(1, min(max_px, math.floor(lw / f + 1e-6)))
    th = max(1, min(max_px, math.floor(lh / f + 1e-6)))
    read_w = min(lw, math.ceil(tw * f - 1e-6))
    rows_per_band = max(1, int(max(1, _BAND_PIXELS // read_w) / f) - 1)  # output rows per band
    canvas = Image.new("RGB", (tw, th))
    for r0 in range(0, th, rows_per_band):
        r1 = min(th, r0 + rows_per_band)
        y0, y1 = r0 * f, r1 * f
        a, b = math.floor(y0), min(lh, math.ceil(y1 - 1e-6))
        region = slide.read_region((0, _level0_row(a, level_ds)), level, (read_w, b - a))
        band = Image.fromarray(region)
        if f == 1.0:
            canvas.paste(band.crop((0, 0, tw, r1 - r0)), (0, r0))
            continue
        box = (0.0, y0 - a, tw * f, min(y1 - a, float(b - a)))
        canvas.paste(band.resize((tw, r1 - r0), Image.Resampling.BOX, box=box), (0, r0))
    return canvas, level_ds * f


def slide_thumbnail(slide_uri: str, max_px: int = 1024) -> tuple[Image.Image, float]:
    """RGB thumbnail of a slide (local path or s3://), longer side ≤ `max_px`, and its downsample.

    The downsample is level-0 pixels per thumbnail pixel (the same along x and y).
    """
    if max_px < 1:
        raise ValueError(f"max_px must be ≥ 1, got {max_px}")
    with open_handle(slide_uri) as slide:
        return _thumbnail(slide, max_px)


# --------------------------------------------------------------------------------------------------------
# heatmaps


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Scores mapped to [0, 1] by rank (ties share their mean rank); one score or all equal give 0.5.

    Attention is typically heavy-tailed: softmax puts most of the mass on a handful of tiles, so a linear
    min-max scale paints those few bright and everything else one flat dark colour. Percentile ranks spread
    the colours evenly over the tiles, show the ordering the model actually uses everywhere on the slide,
    and make maps comparable across slides and models whatever the scale of their raw scores.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    if n == 0:
        return np.zeros(0)
    if n == 1:
        return np.full(1, 0.5)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    mean_rank = ends - (counts + 1) / 2.0  # 0-based mean position of each distinct value
    return mean_rank[inverse.reshape(-1)] / (n - 1)


def _score_map(
    shape: tuple[int, int], downsample: float, coords: np.ndarray, tile_size_level0: float, values: np.ndarray
) -> np.ndarray:
    """(H, W) map of `values` at thumbnail resolution; NaN where no tile; overlapping tiles keep the max.

    A tile covers the thumbnail pixels whose centres fall inside it, and at least one pixel.
    """
    h, w = shape
    out = np.full((h, w), np.nan)
    lo = coords / downsample
    hi = (coords + tile_size_level0) / downsample
    c0 = np.ceil(lo - 0.5).astype(np.int64)
    c1 = np.maximum(np.ceil(hi - 0.5).astype(np.int64), c0 + 1)
    c0, c1 = np.clip(c0, 0, [w, h]), np.clip(c1, 0, [w, h])
    for i in np.argsort(values, kind="stable"):  # ascending: higher scores drawn last win overlaps
        x0, y0 = c0[i]
        x1, y1 = c1[i]
        if x1 > x0 and y1 > y0:
            out[y0:y1, x0:x1] = values[i]
    return out


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    fig.clear()
    return buf.getvalue()


def attention_heatmap(
    thumbnail: Image.Image | np.ndarray,
    downsample: float,
    coords: np.ndarray,
    tile_size_level0: float,
    scores: np.ndarray,
    out_uri: str,
    title: str = "",
) -> np.ndarray:
    """Per-tile scores over a thumbnail, written as a PNG to `out_uri`; returns the (H, W) score map.

    `coords` (N, 2) are level-0 (x, y) tile corners, `scores` (N,) raw scores (attention, logits…),
    normalised by rank (see `rank_normalise`); non-finite scores count as untiled. Tiles are coloured with
    a perceptual colormap, semi-transparent over the tissue; areas without tiles show the thumbnail as is.
    The returned map holds the normalised scores at thumbnail resolution, NaN where there is no tile.
    The image is drawn at one screen pixel per thumbnail pixel, with a title above and a colorbar right.
    """
    image = np.asarray(thumbnail.convert("RGB") if isinstance(thumbnail, Image.Image) else thumbnail)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be an RGB image, got an array of shape {image.shape}")
    coords = np.asarray(coords, dtype=np.float64)
    if coords.size == 0:
        coords = coords.reshape(0, 2)
    scores = np.asarray(scores, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or scores.ndim != 1 or len(scores) != len(coords):
        raise ValueError(f"need one score per tile: coords {coords.shape}, scores {scores.shape}")
    if not downsample > 0 or not tile_size_level0 > 0:
        raise ValueError(f"downsample ({downsample}) and tile size ({tile_size_level0}) must be positive")
    keep = np.isfinite(scores)
    values = rank_normalise(scores[keep])
    h, w = image.shape[:2]
    score_map = _score_map((h, w), float(downsample), coords[keep], float(tile_size_level0), values)

    cmap = colormaps[CMAP]
    overlay = cmap(np.nan_to_num(score_map, nan=0.0))
    overlay[..., 3] = np.where(np.isnan(score_map), 0.0, ALPHA)

    # Fixed margins in inches around an image shown 1:1, so the PNG size follows the thumbnail size.
    left, gap, bar, right, top, bottom = 0.15, 0.15, 0.2, 0.75, 0.45 if title else 0.15, 0.15
    img_w, img_h = w / _DPI, h / _DPI
    fig_w, fig_h = left + img_w + gap + bar + right, bottom + img_h + top
    fig = Figure(figsize=(fig_w, fig_h), dpi=_DPI)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, img_w / fig_w, img_h / fig_h))
    ax.imshow(image, interpolation="none")
    ax.imshow(overlay, interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes(((left + img_w + gap) / fig_w, bottom / fig_h, bar / fig_w, img_h / fig_h))
    colorbar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap), cax=cax)
    colorbar.set_label("score percentile (rank)", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / fig_h, va="top")
    write_bytes_atomic(out_uri, _png(fig))
    return score_map


def slide_heatmap(
    slide_uri: str,
    coords: np.ndarray,
    scores: np.ndarray,
    tile_px: int,
    mpp: float,
    out_uri: str,
    title: str = "",
    max_px: int = 1024,
    *,
    slide_mpp: float | None = None,
) -> np.ndarray:
    """Thumbnail of `slide_uri` with a bag's tile scores on it (see `attention_heatmap`); returns the map.

    The bag's tiles are `tile_px` pixels at `mpp` µm/px, so each spans mpp·tile_px / slide-mpp level-0
    pixels. The slide's mpp comes from its metadata unless `slide_mpp` is given;
    a slide with neither is a `SlideError` naming it.
    """
    with open_handle(slide_uri) as slide:
        level0_mpp = slide_info(slide, slide_mpp).mpp
        if not level0_mpp or level0_mpp <= 0:
            raise SlideError(
                f"slide {slide_uri} has no mpp metadata: cannot size its tiles in "
                "level-0 pixels; pass slide_mpp (or --mpp-override) for it"
            )
        thumbnail, downsample = _thumbnail(slide, max_px)
    tile_size = float(mpp) * float(tile_px) / level0_mpp
    return attention_heatmap(thumbnail, downsample, coords, tile_size, scores, out_uri, title)


# --------------------------------------------------------------------------------------------------------
# training curves


def training_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    out_uri: str,
    metrics: Sequence[str] = ("train_loss", "val_loss", "val_auc"),
) -> list[str]:
    """One subplot per metric, one line per run/fold (x = each record's "epoch"); PNG to `out_uri`.

    Metrics no record has are skipped; records without a metric or with a non-finite value leave a gap
    in that line only. Returns the metrics drawn; raises ValueError when there is none to draw.
    """

    def points(records: Sequence[Mapping[str, float]], metric: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for i, record in enumerate(records):
            value = record.get(metric)
            if value is not None and math.isfinite(float(value)):
                xs.append(float(record.get("epoch", i)))
                ys.append(float(value))
        return xs, ys

    drawn = [m for m in metrics if any(points(records, m)[0] for records in histories.values())]
    if not drawn:
        raise ValueError(f"no record in {sorted(histories)} has any of the metrics {list(metrics)}")
    fig = Figure(figsize=(4.0 * len(drawn), 3.2), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, len(drawn), squeeze=False)[0]
    palette = colormaps["tab10" if len(histories) <= 10 else "tab20"]
    handles = {}
    for ax, metric in zip(axes, drawn, strict=True):
        for k, (name, records) in enumerate(histories.items()):  # one colour per run in every subplot
            xs, ys = points(records, metric)
            if xs:
                order = np.argsort(xs, kind="stable")
                (handles[name],) = ax.plot(
                    np.asarray(xs)[order],
                    np.asarray(ys)[order],
                    color=palette(k % palette.N),
                    marker="o",
                    markersize=3,
                    label=name,
                )
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8)
    write_bytes_atomic(out_uri, _png(fig))
    return drawn


def sweep_plot(
    rows: Sequence[Mapping[str, object]], params: Sequence[str], metric: str, out_uri: str
) -> None:
    """One panel per swept parameter: each trial's best `metric` against the parameter's value (log axis
    when the values span more than two decades; categories spread along the axis); PNG to `out_uri`."""
    fig = Figure(figsize=(3.6 * max(1, len(params)), 3.2), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, max(1, len(params)), squeeze=False)[0]
    ys = np.asarray([float(r[metric]) for r in rows])  # type: ignore[arg-type]
    best = int(np.nanargmin(ys) if metric.endswith("loss") else np.nanargmax(ys))
    for ax, param in zip(axes, params, strict=False):
        values = [r[param] for r in rows]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            xs = np.asarray(values, dtype=float)
            if xs.min() > 0 and xs.max() / xs.min() > 100:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in values})
            xs = np.asarray([labels.index(str(v)) for v in values], dtype=float)
            ax.set_xticks(range(len(labels)), labels)
        ax.scatter(xs, ys, s=24, color="tab:blue", alpha=0.8)
        ax.scatter(xs[best], ys[best], s=80, facecolors="none", edgecolors="tab:red", label="best")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    write_bytes_atomic(out_uri, _png(fig))


def round_metrics(rows: Sequence[Mapping[str, object]], metrics: Sequence[str], out_uri: str) -> None:
    """Rounds side by side (ICMIL): one group of bars per metric, one bar per round, values printed on
    the bars; PNG to `out_uri`."""
    fig = Figure(
        figsize=(1.6 + 1.2 * len(metrics) * max(1, len(rows)) / 2, 3.4), dpi=_DPI, layout="constrained"
    )
    ax = fig.subplots()
    width = 0.8 / max(1, len(rows))
    palette = colormaps["tab10"]
    for k, row in enumerate(rows):
        values = [float(row.get(m, math.nan)) for m in metrics]  # type: ignore[arg-type]
        xs = np.arange(len(metrics)) + (k - (len(rows) - 1) / 2) * width
        bars = ax.bar(xs, values, width, color=palette(k % palette.N), label=f"round {row['round']}")
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(metrics)), list(metrics))
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test part")
    ax.set_title("per round", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(fontsize=8, loc="outside right upper")
    write_bytes_atomic(out_uri, _png(fig))


def embedding_map(points: Mapping[str, np.ndarray], labels: Sequence[str], out_uri: str) -> None:
    """Slide embeddings side by side (e.g. Giga-SSL and a baseline): each panel is the embedding's first
    two principal components, one colour per label; PNG to `out_uri`."""
    from sklearn.decomposition import PCA

    classes = sorted(set(labels))
    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    fig = Figure(figsize=(4.0 * len(points) + 1.2, 3.6), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, len(points), squeeze=False)[0]
    handles = {}
    for ax, (name, matrix) in zip(axes, points.items(), strict=True):
        pca = PCA(n_components=2).fit(matrix)
        xy = pca.transform(matrix)
        for k, label in enumerate(classes):
            rows = np.array([lab == label for lab in labels])
            handles[label] = ax.scatter(xy[rows, 0], xy[rows, 1], s=22, alpha=0.85, label=str(label),
                                        color=palette(k % palette.N))  # fmt: skip
        share = pca.explained_variance_ratio_
        ax.set_title(name)
        ax.set_xlabel(f"PC1 ({share[0]:.0%})")
        ax.set_ylabel(f"PC2 ({share[1]:.0%})")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8)
    write_bytes_atomic(out_uri, _png(fig))
