"""Deterministic synthetic H&E-like whole-slide images, written as real pyramidal tiled-JPEG TIFF/SVS files.

Every pixel of every pyramid level comes from one procedural renderer (`_SlideModel._render`) that works in
level-0 coordinates at any downsample, so levels agree with each other and no level is ever held in memory:
tiles are produced by a generator and streamed into tifffile.

The look is built from three ingredients:

* low-resolution *fields* on a grid of `MASK_DOWNSAMPLE` level-0 pixels (tissue pieces, tumour blobs, pen
  strokes, nucleus density, stain variation), interpolated bilinearly per tile so edges are smooth; the
  ground-truth masks are these same fields sampled at the grid cell centres;
* small *periodic textures* rendered once per slide at level-0 scale (fibrous eosin stroma, stromal and
  lymphocyte nuclei, densely packed tumour cells) and box-filtered per pyramid level;
* a Beer-Lambert colour model: haematoxylin/eosin concentrations times stain optical-density vectors,
  plus ink for pen marks, on white glass.

Two difficulties. "easy" slides keep one staining and draw tumour darker than normal tissue over 12-26 %
of it: colour alone finds it. "hard" cohorts (`cohort_specs(..., difficulty="hard")`) are made so that a
method has to learn morphology: every site (lab/scanner) has its own stain vectors and intensities, every
slide a jitter of its site's, tumour has the normal tissue's mean stain concentrations (it differs in
nuclear size, crowding and texture only), and tumour covers a few percent of the tissue down to one focus.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import multiprocessing
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, get_args

import fsspec
import numpy as np
import tifffile
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from slidestream.cluster.errors import SlidestreamError
from slidestream.pipelines.slides import slide_id_from_uri
from slidestream.pipelines.synthetic_dicom import SeriesIds, write_dicom_series
from slidestream.pipelines.synthetic_ndpi import write_ndpi

SIZES: dict[str, tuple[int, int]] = {
    "tiny": (8192, 6144),
    "small": (24576, 16384),
    "large": (49152, 32768),
}
MASK_DOWNSAMPLE = 32

_G = MASK_DOWNSAMPLE  # field grid spacing (level-0 px)
_GLASS = 241.0
_INKS = {  # approximate optical density of marker ink at full strength
    "green": -np.log(np.array([30.0, 128.0, 78.0]) / _GLASS),
    "blue": -np.log(np.array([38.0, 66.0, 158.0]) / _GLASS),
    "black": -np.log(np.array([36.0, 36.0, 42.0]) / _GLASS),
}
_KAPPA = 0.7  # mean per-channel OD of a unit stain concentration, used to average concentrations
_FAINT = 0.13  # stain strength of the faint tissue piece
_MAX_CHUNK_W = 1024  # widest block rendered at once (level tiles are rendered in row segments)
_MAX_CHUNK_H = 256
_P_FIBRE = (512, 448)  # texture periods (level-0 px); multiples of 64 so the mip levels stay periodic
_P_NUCLEI = 576
_P_TUMOUR = 640
_P_NOISE = 509
_APERIO_HEADER = "Aperio Image Library v12.0.15"


class SynthError(SlidestreamError, ValueError):
    """A synthetic cohort was asked for with settings that cannot make one."""


@dataclass(frozen=True)
class Staining:
    """One slide's H&E: stain optical-density vectors (RGB, per unit concentration) and a gain per stain."""

    h_od: tuple[float, float, float] = (0.5626, 0.7201, 0.4062)
    e_od: tuple[float, float, float] = (0.2159, 0.8012, 0.5581)
    h_gain: float = 1.0
    e_gain: float = 1.0


DEFAULT_STAINING = Staining()
HARD_TUMOUR_COVER = (0.005, 0.08)  # hard cohorts: tumour fraction of tissue, log-uniform per slide
HARD_SITES = 3
DIFFICULTIES = ("easy", "hard")
SlideFormat = Literal["svs", "tiff", "ome-tiff", "ndpi", "dicom"]
SLIDE_FORMATS: tuple[str, ...] = get_args(SlideFormat)
# a DICOM-WSI slide is a folder of instances
_FILE_NAMES = {
    "svs": "{}.svs",
    "tiff": "{}.tiff",
    "ome-tiff": "{}.ome.tiff",
    "ndpi": "{}.ndpi",
    "dicom": "{}",
}


@dataclass(frozen=True)
class SlideSpec:
    """What to draw: level-0 size, metadata and content switches."""

    width: int
    height: int
    mpp: float | None = 0.25  # None: no mpp metadata at all
    fmt: SlideFormat = "svs"
    positive: bool = False  # has tumour regions of distinct morphology
    n_pieces: int = 3  # tissue pieces; 0: blank glass
    pen_marks: bool = False
    faint_tissue: bool = False  # one extra very pale piece
    seed: int = 0
    tile: int = 256
    jpeg_quality: int = 85
    staining: Staining = DEFAULT_STAINING
    tumour_cover: float | None = None  # fraction of the tissue that is tumour; None: 12-26 %, drawn
    tumour_matched: bool = False  # tumour has the normal tissue's mean stain: it differs in texture only


@dataclass
class SlideTruth:
    """Ground truth at level-0 / `mask_downsample` (one mask pixel per field grid cell)."""

    tumour_mask: np.ndarray  # bool (ceil(h / ds), ceil(w / ds))
    tissue_mask: np.ndarray  # bool, same shape; tissue pieces incl. the faint one, never pen
    mask_downsample: int = MASK_DOWNSAMPLE


@dataclass
class SynthDataset:
    uris: list[str]
    labels_uri: str
    slide_ids: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sites: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class CohortSlide:
    spec: SlideSpec
    site: int  # the lab/scanner whose staining the slide has (always 0 in easy cohorts)


# --------------------------------------------------------------------------------------------------------
# small numeric helpers


def _lattice_weights(u: np.ndarray, n: int, periodic: bool, smooth: bool) -> np.ndarray:
    """Dense (len(u), n) interpolation matrix between lattice points at integer positions of `u`."""
    i0 = np.floor(u)
    t = (u - i0).astype(np.float32)
    if smooth:
        t = t * t * (3 - 2 * t)
    i0 = i0.astype(np.int64)
    if periodic:
        a, b = i0 % n, (i0 + 1) % n
    else:
        a, b = np.clip(i0, 0, n - 1), np.clip(i0 + 1, 0, n - 1)
    w = np.zeros((len(u), n), np.float32)
    rows = np.arange(len(u))
    np.add.at(w, (rows, a), 1 - t)
    np.add.at(w, (rows, b), t)
    return w


def _value_noise(rng: np.random.Generator, ny: int, nx: int, spacing: float, periodic: bool) -> np.ndarray:
    """Value noise in [0, 1] on an (ny, nx) grid, lattice spacing in grid pixels; optionally tileable."""
    if periodic:
        ly, lx = max(1, round(ny / spacing)), max(1, round(nx / spacing))
        uy: np.ndarray = (np.arange(ny) + 0.5) * ly / ny
        ux: np.ndarray = (np.arange(nx) + 0.5) * lx / nx
    else:
        ly, lx = int(ny / spacing) + 2, int(nx / spacing) + 2
        uy = (np.arange(ny) + 0.5) / spacing
        ux = (np.arange(nx) + 0.5) / spacing
    lattice = rng.random((ly, lx), dtype=np.float32)
    wy = _lattice_weights(uy, ly, periodic, smooth=True)
    wx = _lattice_weights(ux, lx, periodic, smooth=True)
    return wy @ lattice @ wx.T


def _field_weights(coords: np.ndarray, n: int) -> tuple[int, int, np.ndarray, tuple]:
    """Bilinear weights from level-0 coordinates onto the field grid (cell centres), restricted to a block.

    Returns the block's [lo, hi) grid range, the dense weight matrix and its sparse form (a, b, t): each
    coordinate is (1 - t) * cell a + t * cell b, indices relative to lo.
    """
    u = coords / _G - 0.5
    i0 = np.floor(u)
    t = (u - i0).astype(np.float32)
    a = np.clip(i0.astype(np.int64), 0, n - 1)
    b = np.clip(i0.astype(np.int64) + 1, 0, n - 1)
    lo, hi = int(a.min()), int(b.max()) + 1
    w = np.zeros((len(coords), hi - lo), np.float32)
    rows = np.arange(len(coords))
    w[rows, a - lo] = 1 - t
    w[rows, b - lo] += t
    return lo, hi, w, (a - lo, b - lo, t)


def _poisson_points(rng: np.random.Generator, period: int, dmin: float, tries: int) -> np.ndarray:
    """Random points on a torus of side `period`, no two closer than `dmin` (dart throwing)."""
    pts = np.empty((tries, 2))
    n = 0
    for cand in rng.random((tries, 2)) * period:
        d = np.abs(pts[:n] - cand)
        d = np.minimum(d, period - d)
        if not n or (d[:, 0] ** 2 + d[:, 1] ** 2).min() >= dmin * dmin:
            pts[n] = cand
            n += 1
    return pts[:n]


def _transmittance_scale(light: Callable[[float], float], target: float) -> float:
    """The factor s with light(s) = target, by bisection (light falls as the concentration scale s grows)."""
    lo, hi = 0.0, 8.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if light(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _harmonic_radius(rng: np.random.Generator, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """Amplitudes and phases of cos(k θ) boundary harmonics k = 2..6 for an irregular blob."""
    ks = np.arange(2, 7)
    amps = rng.uniform(0, strength, len(ks)) / ks**0.8
    phases = rng.uniform(0, 2 * np.pi, len(ks))
    return amps, phases


def _radius(theta: np.ndarray, amps: np.ndarray, phases: np.ndarray) -> np.ndarray:
    r = np.ones_like(theta)
    for k, (a, p) in enumerate(zip(amps, phases, strict=True), start=2):
        r += a * np.cos(k * theta + p)
    return r


def _stamp(canvas: np.ndarray, y: float, x: float, half: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Offsets (dy, dx) of a (2 half + 1)^2 window around (y, x) on a torus and the index into `canvas`."""
    p = canvas.shape[0]
    iy = np.arange(int(y) - half, int(y) + half + 1)
    ix = np.arange(int(x) - half, int(x) + half + 1)
    dy = (iy + 0.5 - y)[:, None]
    dx = (ix + 0.5 - x)[None, :]
    return dy, dx, np.ix_(iy % p, ix % p)


def _ellipse_sd(dy: np.ndarray, dx: np.ndarray, r: float, elong: float, angle: float) -> np.ndarray:
    """Approximate signed distance (px, positive inside) to an ellipse of area π r²."""
    c, s = math.cos(angle), math.sin(angle)
    a = dx * c + dy * s
    b = -dx * s + dy * c
    ra, rb = r * math.sqrt(elong), r / math.sqrt(elong)
    rho = np.sqrt((a / ra) ** 2 + (b / rb) ** 2)
    return (1 - rho) * rb


# --------------------------------------------------------------------------------------------------------
# periodic textures


class _Tex:
    """A periodic scalar texture with box-filtered mip levels and wrap-padded windows for cheap slicing."""

    def __init__(self, base: np.ndarray, mode: Literal["od", "min", "mean"]) -> None:
        self.base = base.astype(np.float32)
        self.mode = mode
        self._cache: dict[float, tuple[int, np.ndarray]] = {}

    def _mip(self, d: float) -> np.ndarray:
        p0 = self.base.shape[0]
        di = round(d)
        if abs(d - di) < 1e-9 and di >= 1 and p0 % di == 0 and p0 // di >= 2:
            if di == 1:
                return self.base
            blocks = self.base.reshape(p0 // di, di, p0 // di, di)
            if self.mode == "min":
                return blocks.min(axis=(1, 3))
            if self.mode == "mean":
                return blocks.mean(axis=(1, 3))
            return -np.log(np.exp(-_KAPPA * blocks).mean(axis=(1, 3))) / _KAPPA
        if self.mode == "min":  # too coarse: every nucleus counts as present somewhere in the pixel
            return np.full((1, 1), -1.0, np.float32)
        if self.mode == "mean":
            return np.full((1, 1), self.base.mean(), np.float32)
        return np.full((1, 1), -np.log(np.exp(-_KAPPA * self.base).mean()) / _KAPPA, np.float32)

    def level(self, d: float) -> tuple[int, np.ndarray]:
        if d not in self._cache:
            mip = self._mip(d).astype(np.float32)
            p = mip.shape[0]
            reps_y = math.ceil((p + _MAX_CHUNK_H) / p)
            reps_x = math.ceil((p + _MAX_CHUNK_W) / p)
            self._cache[d] = (p, np.tile(mip, (reps_y, reps_x)))
        return self._cache[d]

    def window(self, d: float, iy0: int, ix0: int, h: int, w: int) -> np.ndarray:
        p, ext = self.level(d)
        oy, ox = iy0 % p, ix0 % p
        if oy + h <= ext.shape[0] and ox + w <= ext.shape[1]:
            return ext[oy : oy + h, ox : ox + w]
        return ext[:p, :p].take((oy + np.arange(h)) % p, axis=0).take((ox + np.arange(w)) % p, axis=1)


def _fibre_texture(rng: np.random.Generator, period: int, angle: float, k: float) -> np.ndarray:
    """Eosin concentration of wavy fibrous stroma with pale clefts."""
    m = period / (22.0 * k)
    kx, ky = round(m * math.cos(angle)), round(m * math.sin(angle))
    if kx == 0 and ky == 0:
        kx = 1
    yy, xx = np.mgrid[0:period, 0:period].astype(np.float32)
    warp = (_value_noise(rng, period, period, period / 4, True) - 0.5) * 2 * np.pi * 5
    warp += (_value_noise(rng, period, period, 24 * k, True) - 0.5) * 2 * np.pi * 0.6
    fib = 0.5 + 0.5 * np.sin(2 * np.pi * (kx * xx + ky * yy) / period + warp)
    bundles = np.clip((_value_noise(rng, period, period, 28 * k, True) - 0.25) * 2, 0, 1)
    fib = fib**1.5 * (0.35 + 0.65 * bundles)
    fine = _value_noise(rng, period, period, 7 * k, True)
    coarse = _value_noise(rng, period, period, 90 * k, True)
    conc = 0.2 + 0.75 * (0.6 * fib + 0.4 * fine) * (0.7 + 0.6 * coarse)
    cleft = _value_noise(rng, period, period, 45 * k, True) + 0.5 * _value_noise(
        rng, period, period, 17 * k, True
    )
    conc *= 1 - 0.75 * np.clip((cleft - 1.05) / 0.1, 0, 1)
    return conc


def _nuclei_texture(rng: np.random.Generator, period: int, angle: float, k: float) -> tuple[np.ndarray, ...]:
    """Stromal (spindle) and lymphocyte nuclei: haematoxylin concentration and per-nucleus rank in [0, 1)."""
    conc = np.zeros((period, period), np.float32)
    rank = np.full((period, period), 2.0, np.float32)
    chromatin = _value_noise(rng, period, period, 3 * k, True)
    for y, x in _poisson_points(rng, period, 24 * k, period * period // 400):
        lymph = rng.random() < 0.3
        if lymph:
            r, elong, ang, dark = (
                rng.uniform(6.0, 7.5) * k,
                rng.uniform(1.0, 1.25),
                rng.uniform(0, np.pi),
                1.5,
            )
        else:
            r, elong = rng.uniform(5.0, 6.5) * k, rng.uniform(2.2, 3.5)
            ang, dark = angle + rng.normal(0, 0.35), rng.uniform(0.9, 1.3)
        dy, dx, idx = _stamp(conc, y, x, math.ceil(r * math.sqrt(elong)) + 2)
        cov = np.clip(0.5 + _ellipse_sd(dy, dx, r, elong, ang), 0, 1)
        value = cov * dark * (0.8 + 0.4 * chromatin[idx])
        conc[idx] = np.maximum(conc[idx], value)
        rank[idx] = np.where(cov > 0, np.minimum(rank[idx], rng.random()), rank[idx])
    return conc, rank


def _tumour_texture(rng: np.random.Generator, period: int, k: float) -> tuple[np.ndarray, np.ndarray]:
    """Sheets of large, crowded, hyperchromatic nuclei with nucleoli in purple-tinged cytoplasm."""
    cyto_e = 0.26 + 0.14 * _value_noise(rng, period, period, 12 * k, True)
    cyto_h = 0.20 + 0.10 * _value_noise(rng, period, period, 12 * k, True)
    chromatin = _value_noise(rng, period, period, 2.5 * k, True)
    conc_e, conc_h = cyto_e.copy(), cyto_h.copy()
    for y, x in _poisson_points(rng, period, 25 * k, period * period // 60):
        r, elong, ang = rng.uniform(9.5, 13.0) * k, rng.uniform(1.0, 1.6), rng.uniform(0, np.pi)
        dark = rng.uniform(1.05, 1.5)
        dy, dx, idx = _stamp(conc_h, y, x, math.ceil(r * math.sqrt(elong)) + 2)
        sd = _ellipse_sd(dy, dx, r, elong, ang)
        cov = np.clip(0.5 + sd, 0, 1)
        rim = np.clip(1 - np.abs(sd - 1.5 * k) / (1.5 * k), 0, 1) * 0.35  # darker nuclear membrane
        value = dark * (0.55 + 0.7 * chromatin[idx]) + rim
        for _ in range(int(rng.integers(1, 3))):  # nucleoli
            ny, nx = rng.normal(0, r * 0.3, 2)
            value = value + 0.7 * np.clip(1.5 - np.hypot(dy - ny, dx - nx) / (1.6 * k), 0, 1)
        conc_h[idx] = conc_h[idx] * (1 - cov) + cov * np.maximum(value, conc_h[idx])
        conc_e[idx] = conc_e[idx] * (1 - 0.6 * cov)
    return conc_e, conc_h


_LUT_N = 512  # concentration levels per stain in the colour lookup table
_LUT_SCALE = 200.0  # levels per unit concentration


@functools.cache
def _lut(h_od: tuple[float, float, float], e_od: tuple[float, float, float]) -> np.ndarray:
    """RGB (N*N, 3) uint8 for every (eosin, haematoxylin) concentration pair on glass."""
    c = np.arange(_LUT_N, dtype=np.float32) / _LUT_SCALE
    od = c[:, None, None] * np.array(e_od, np.float32) + c[None, :, None] * np.array(h_od, np.float32)
    return np.clip(_GLASS * np.exp(-od) + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)


class _View:
    """One block being rendered: pixel coordinates and cheap access to the fields over it."""

    def __init__(self, model: _SlideModel, x0: float, y0: float, w: int, h: int, d: float) -> None:
        self.model, self.w, self.h, self.d = model, w, h, d
        self.xs = x0 + (np.arange(w) + 0.5) * d
        self.ys = y0 + (np.arange(h) + 0.5) * d
        self.ix0, self.iy0 = math.floor(x0 / d + 0.5), math.floor(y0 / d + 0.5)
        self.xlo, self.xhi, self.wx, self.sx = _field_weights(self.xs, model.gw)
        self.ylo, self.yhi, self.wy, _ = _field_weights(self.ys, model.gh)
        self.edge = max(d, 1.5)
        # slowly varying fields are evaluated once per f x f pixels and broadcast
        self.f = 8 if h % 8 == 0 and w % 8 == 0 else 1
        if self.f > 1:
            f = self.f
            self.cxlo, self.cxhi, self.cwx, _ = _field_weights(
                x0 + (np.arange(w // f) * f + f / 2) * d, model.gw
            )
            self.cylo, self.cyhi, self.cwy, _ = _field_weights(
                y0 + (np.arange(h // f) * f + f / 2) * d, model.gh
            )

    def alpha(self, i: int) -> np.ndarray | float:
        """Antialiased coverage (0..1) of a signed-distance field; a float where it is constant."""
        block = self.model.fields[i, self.ylo : self.yhi, self.xlo : self.xhi]
        if block.min() >= self.edge / 2:
            return 1.0
        if block.max() <= -self.edge / 2:
            return 0.0
        # rows by a small matrix product, columns by gather + lerp (no large BLAS call: those are slow
        # when BLAS threads compete for cores)
        rows = self.wy @ block
        a, b, t = self.sx
        left = rows.take(a, axis=1)
        values = rows.take(b, axis=1)
        values -= left
        values *= t
        values += left
        values *= 1.0 / self.edge
        values += 0.5
        return np.clip(values, 0.0, 1.0, out=values)

    def smooth(self, i: int) -> np.ndarray:
        """A slowly varying field at the coarse (f x f) sampling."""
        if self.f == 1:
            return self.wy @ self.model.fields[i, self.ylo : self.yhi, self.xlo : self.xhi] @ self.wx.T
        return self.cwy @ self.model.fields[i, self.cylo : self.cyhi, self.cxlo : self.cxhi] @ self.cwx.T

    def v4(self, a: np.ndarray) -> np.ndarray:
        """(h, w) array as (h/f, f, w/f, f) so coarse fields broadcast against it."""
        f = self.f
        return a.reshape(self.h // f, f, self.w // f, f) if f > 1 else a

    def bc(self, c: np.ndarray) -> np.ndarray:
        return c[:, None, :, None] if self.f > 1 else c


# --------------------------------------------------------------------------------------------------------
# the slide model


class _SlideModel:
    """All random choices of one slide, made once; `_render` draws any region at any downsample."""

    def __init__(self, spec: SlideSpec) -> None:
        if spec.width < 64 or spec.height < 64:
            raise ValueError("slide must be at least 64x64 px")
        if spec.tile % 16:
            raise ValueError("tile size must be a multiple of 16")
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0x5EED])
        k = 1.0 if spec.mpp is None else float(np.clip(0.25 / spec.mpp, 0.25, 2.0))
        self.gw, self.gh = math.ceil(spec.width / _G), math.ceil(spec.height / _G)
        gx = ((np.arange(self.gw) + 0.5) * _G).astype(np.float32)
        gy = ((np.arange(self.gh) + 0.5) * _G).astype(np.float32)
        self._gx, self._gy = gx[None, :], gy[:, None]

        pieces, faint = self._place_pieces(rng, spec)
        radius = max([p["r"] for p in pieces] + ([faint["r"]] if faint else []) + [_G])
        # boundary irregularity scales with the pieces (a fixed spacing would shred large slides' pieces)
        wobble = (_value_noise(rng, self.gh, self.gw, max(4.0, radius / _G / 3.5), False) - 0.5) * 2
        tissue = np.full((self.gh, self.gw), -1e4, np.float32)
        piece_fields = []
        for piece in pieces:
            f = self._piece_field(rng, piece, wobble)
            piece_fields.append(f)
            tissue = np.maximum(tissue, f)
        faint_field = self._piece_field(rng, faint, wobble) if faint else None

        tumour = self._tumour_field(rng, pieces, piece_fields, tissue) if spec.positive and pieces else None

        density = 0.12 + 0.7 * _value_noise(rng, self.gh, self.gw, 14, False) ** 1.5
        orient = np.clip((_value_noise(rng, self.gh, self.gw, 20, False) - 0.5) * 3 + 0.5, 0, 1)
        stain = 0.82 + 0.36 * _value_noise(rng, self.gh, self.gw, 30, False)

        names = ["tissue", "density", "orient", "stain"]
        arrays: list[np.ndarray] = [tissue, density, orient, stain]
        if faint_field is not None:
            names.append("faint")
            arrays.append(faint_field)
        if tumour is not None:
            names.append("tumour")
            arrays.append(tumour)
        self.pens: list[tuple[int, np.ndarray, tuple[float, float, float, float]]] = []
        if spec.pen_marks:
            for i, (pen_field, ink, bbox) in enumerate(self._pen_fields(rng, tissue, faint_field)):
                names.append(f"pen{i}")
                arrays.append(pen_field)
                self.pens.append((len(names) - 1, ink, bbox))
        self.index = {n: i for i, n in enumerate(names)}
        self.fields = np.stack(arrays).astype(np.float32)

        tissue_mask = tissue > 0
        if faint_field is not None:
            tissue_mask |= faint_field > 0
        self.truth = SlideTruth(
            tumour_mask=(tumour > 0) if tumour is not None else np.zeros((self.gh, self.gw), bool),
            tissue_mask=tissue_mask,
        )

        angle1 = rng.uniform(0, np.pi)
        angle2 = angle1 + rng.uniform(0.6, 1.2) * rng.choice([-1, 1])
        self.fibre = [
            _Tex(_fibre_texture(rng, _P_FIBRE[0], angle1, k), "od"),
            _Tex(_fibre_texture(rng, _P_FIBRE[1], angle2, k), "od"),
        ]
        conc, rank = _nuclei_texture(rng, _P_NUCLEI, angle1, k)
        self.nuc_conc, self.nuc_rank = _Tex(conc, "od"), _Tex(rank, "min")
        self.tum_e: _Tex | None = None
        self.tum_h: _Tex | None = None
        if tumour is not None:
            te, th = _tumour_texture(rng, _P_TUMOUR, k)
            if spec.tumour_matched:
                te, th = self._matched_tumour(te, th, density[tissue > 0], stain[tissue > 0], conc)
            self.tum_e, self.tum_h = _Tex(te, "od"), _Tex(th, "od")
        self.glass = _Tex(np.abs(rng.normal(0, 0.006, (_P_NOISE, _P_NOISE))), "mean")  # faint glass noise

    # ---- construction helpers

    def _matched_tumour(
        self, te: np.ndarray, th: np.ndarray, density: np.ndarray, stain: np.ndarray, nuclei: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tumour textures scaled to normal tissue's mean transmittance, per stain and then in every channel.

        Normal eosin is the fibre textures times the stain field; normal haematoxylin is the stromal nuclei
        present (a `density` share of them) over a background of 0.04. Matching mean light, not mean
        concentration, matters: normal tissue's pale clefts make it brighter than a smoother texture of the
        same mean concentration. What is left is pale, vesicular tumour nuclei in eosinophilic cytoplasm:
        the surrounding tissue's colour and brightness, another texture.
        """
        staining = self.spec.staining
        e_od = np.array(staining.e_od, np.float32) * staining.e_gain
        h_od = np.array(staining.h_od, np.float32) * staining.h_gain
        p = float(density.mean()) if density.size else 0.5
        fibres = np.concatenate([self.fibre[0].base.ravel(), self.fibre[1].base.ravel()])
        normal_e = fibres * (float(stain.mean()) if stain.size else 1.0)
        present = nuclei.ravel() + 0.04

        def light(conc: np.ndarray, od: np.ndarray) -> np.ndarray:
            """Mean transmittance per channel of a concentration sample through one stain."""
            return np.exp(-conc.ravel()[:, None] * od).mean(0)

        normal_h_light = p * light(present, h_od) + (1 - p) * np.exp(-0.04 * h_od)
        normal = light(normal_e, e_od) * normal_h_light  # eosin and haematoxylin are independent there
        e_target = float(light(normal_e, e_od).mean())
        e_sample, h_sample = te[::3, ::3], th[::3, ::3]  # every 9th pixel calibrates to < 1 %
        e_scale = _transmittance_scale(lambda s: float(light(s * e_sample, e_od).mean()), e_target)
        h_scale = _transmittance_scale(
            lambda s: float(light(s * h_sample, h_od).mean()), float(normal_h_light.mean())
        )
        joint = np.stack([e_scale * e_sample.ravel(), h_scale * h_sample.ravel()], 1)
        od = np.stack([e_od, h_od])
        scale = _transmittance_scale(lambda s: float(np.exp(-s * joint @ od).mean()), float(normal.mean()))
        return te * (e_scale * scale), th * (h_scale * scale)

    def _place_pieces(self, rng: np.random.Generator, spec: SlideSpec) -> tuple[list[dict], dict | None]:
        w, h = spec.width, spec.height
        n = max(0, spec.n_pieces)
        r_base = math.sqrt(0.45 * w * h / (math.pi * max(n, 1) * 0.8))
        r_base = min(r_base, 0.42 * min(w, h))
        pieces: list[dict] = []
        shrink = 1.0
        while len(pieces) < n:
            placed = False
            for _ in range(300):
                r = r_base * shrink * rng.uniform(0.8, 1.15)
                aspect = rng.uniform(0.6, 1.0)
                margin = r * 0.95
                if 2 * margin >= min(w, h):
                    continue
                cx, cy = rng.uniform(margin, w - margin), rng.uniform(margin, h - margin)
                if all(math.hypot(cx - p["cx"], cy - p["cy"]) > 1.05 * (r + p["r"]) for p in pieces):
                    pieces.append({"cx": cx, "cy": cy, "r": r, "aspect": aspect})
                    placed = True
                    break
            if not placed:
                shrink *= 0.9
        faint = None
        if spec.faint_tissue:
            rf = 0.5 * (r_base if n else 0.3 * min(w, h))
            for attempt in range(400):
                r = rf * (0.97 ** (attempt // 40))
                cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
                if all(math.hypot(cx - p["cx"], cy - p["cy"]) > 1.1 * (r + p["r"]) for p in pieces):
                    faint = {"cx": cx, "cy": cy, "r": r, "aspect": rng.uniform(0.6, 1.0)}
                    break
        return pieces, faint

    def _piece_field(self, rng: np.random.Generator, piece: dict, wobble: np.ndarray) -> np.ndarray:
        """Approximate signed distance (level-0 px) to an irregular blob with a few holes."""
        amps, phases = _harmonic_radius(rng, 0.35)
        alpha = rng.uniform(0, np.pi)
        dx, dy = self._gx - piece["cx"], self._gy - piece["cy"]
        u = dx * math.cos(alpha) + dy * math.sin(alpha)
        v = (-dx * math.sin(alpha) + dy * math.cos(alpha)) / piece["aspect"]
        r = piece["r"] * _radius(np.arctan2(v, u), amps, phases)
        f = r - np.hypot(u, v) + 0.22 * piece["r"] * wobble
        for _ in range(int(rng.integers(0, 4))):  # holes (vessels, fat)
            ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.55) * piece["r"]
            hx = piece["cx"] + dist * math.cos(ang)
            hy = piece["cy"] + dist * math.sin(ang) * piece["aspect"]
            rh = piece["r"] * rng.uniform(0.04, 0.1)
            f = np.minimum(f, np.hypot(self._gx - hx, self._gy - hy) - rh)
        return f.astype(np.float32)

    def _tumour_field(
        self, rng: np.random.Generator, pieces: list[dict], fields: list[np.ndarray], tissue: np.ndarray
    ) -> np.ndarray:
        """1-3 irregular blobs inside tissue covering `tumour_cover` of it (scale solved as a quantile)."""
        inside = tissue > 0
        if not inside.any():
            return np.full_like(tissue, -1e4)
        blobs = []
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(len(pieces)))
            interior = np.argwhere(fields[i] > 0.3 * pieces[i]["r"])
            if not len(interior):
                interior = np.argwhere(fields[i] > 0)
            if not len(interior):
                continue
            cyi, cxi = interior[rng.integers(len(interior))]
            amps, phases = _harmonic_radius(rng, 0.25)
            blobs.append(
                ((cxi + 0.5) * _G, (cyi + 0.5) * _G, pieces[i]["r"] * rng.uniform(0.3, 0.6), amps, phases)
            )
        if not blobs:
            return np.full_like(tissue, -1e4)
        rho = np.full(tissue.shape, np.inf, np.float32)
        radii = []
        for cx, cy, rb, amps, phases in blobs:
            dx, dy = self._gx - cx, self._gy - cy
            rr = rb * _radius(np.arctan2(dy, dx), amps, phases)
            radii.append((np.hypot(dx, dy), rr))
            rho = np.minimum(rho, radii[-1][0] / rr)
        target = rng.uniform(0.12, 0.26) if self.spec.tumour_cover is None else self.spec.tumour_cover
        scale = float(np.quantile(rho[inside], target))
        blob_sd = np.full(tissue.shape, -np.inf, np.float32)
        for dist, rr in radii:
            blob_sd = np.maximum(blob_sd, scale * rr - dist)
        return np.minimum(blob_sd, tissue).astype(np.float32)

    def _pen_fields(
        self, rng: np.random.Generator, tissue: np.ndarray, faint: np.ndarray | None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]]:
        """2-3 thick marker strokes (quadratic Bézier), each starting on glass: (sdf field, ink OD, bbox)."""
        w, h = self.spec.width, self.spec.height
        glass = tissue < -0.05 * min(w, h)
        if faint is not None:
            glass &= faint < 0
        glass_cells = np.argwhere(glass)
        colours = list(_INKS)
        for _ in range(int(rng.integers(2, 4))):
            hw = rng.uniform(0.006, 0.011) * min(w, h)
            if len(glass_cells):
                gy, gx = glass_cells[rng.integers(len(glass_cells))]
                p0 = np.array([(gx + 0.5) * _G, (gy + 0.5) * _G])
            else:
                p0 = rng.uniform(0, 1, 2) * (w, h)
            ang = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.25, 0.5) * min(w, h)
            p2 = np.clip(p0 + length * np.array([math.cos(ang), math.sin(ang)]), 0, (w, h))
            p1 = (p0 + p2) / 2 + rng.normal(0, 0.15 * length, 2)
            t = np.linspace(0, 1, max(8, math.ceil(2 * length / (hw / 3))))[:, None]
            pts = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2).astype(np.float32)
            sdf = np.full((self.gh, self.gw), -1e4, np.float32)
            pad = hw + 3 * _G
            x0, y0 = pts.min(0) - pad
            x1, y1 = pts.max(0) + pad
            cx0, cx1 = max(0, int(x0 // _G)), min(self.gw, int(x1 // _G) + 1)
            cy0, cy1 = max(0, int(y0 // _G)), min(self.gh, int(y1 // _G) + 1)
            gxs = self._gx[0, cx0:cx1]
            rows_per_chunk = max(1, 2_000_000 // max(1, len(gxs) * len(pts)))
            for r0 in range(cy0, cy1, rows_per_chunk):
                gys = self._gy[r0 : min(cy1, r0 + rows_per_chunk), 0]
                ddx = gxs[None, :, None] - pts[None, None, :, 0]
                ddy = gys[:, None, None] - pts[None, None, :, 1]
                dist = np.sqrt((ddx**2 + ddy**2).min(axis=2))
                sdf[r0 : r0 + len(gys), cx0:cx1] = hw - dist
            ink = (_INKS[colours[int(rng.integers(len(colours)))]] * rng.uniform(0.75, 0.95)).astype(
                np.float32
            )
            yield sdf, ink, (float(x0), float(y0), float(x1), float(y1))

    # ---- rendering

    def _render(self, x0: float, y0: float, w: int, h: int, downsample: float) -> np.ndarray:
        """RGB uint8 (h, w, 3): level-0 region starting at (x0, y0), sampled every `downsample` px."""
        if w > _MAX_CHUNK_W or h > _MAX_CHUNK_H:
            rows = []
            for ry in range(0, h, _MAX_CHUNK_H):
                rh = min(_MAX_CHUNK_H, h - ry)
                cols = [
                    self._render(
                        x0 + rx * downsample, y0 + ry * downsample, min(_MAX_CHUNK_W, w - rx), rh, downsample
                    )
                    for rx in range(0, w, _MAX_CHUNK_W)
                ]
                rows.append(np.concatenate(cols, axis=1))
            return np.concatenate(rows, axis=0)
        view = _View(self, x0, y0, w, h, float(downsample))
        conc_e, conc_h = self._stain(view)
        staining = self.spec.staining
        if staining.h_gain != 1.0 or staining.e_gain != 1.0:
            conc_e, conc_h = conc_e * staining.e_gain, conc_h * staining.h_gain
        conc_h = conc_h + self.glass.window(view.d, view.iy0, view.ix0, h, w)
        pens = []
        for fi, ink, (bx0, by0, bx1, by1) in self.pens:
            if view.xs[-1] < bx0 or view.xs[0] > bx1 or view.ys[-1] < by0 or view.ys[0] > by1:
                continue
            a = view.alpha(fi)
            if not (isinstance(a, float) and a == 0.0):
                pens.append((a, ink))
        if not pens:  # fast path: quantised concentrations through a lookup table
            qh = np.minimum((conc_h * _LUT_SCALE + 0.5).astype(np.int32), _LUT_N - 1)
            if isinstance(conc_e, np.ndarray):
                qh += np.minimum((conc_e * _LUT_SCALE + 0.5).astype(np.int32), _LUT_N - 1) * _LUT_N
            return _lut(staining.h_od, staining.e_od).take(qh, axis=0)
        conc_e = np.broadcast_to(np.asarray(conc_e, np.float32), (h, w))
        od = conc_e[..., None] * np.array(staining.e_od, np.float32)
        od = od + conc_h[..., None] * np.array(staining.h_od, np.float32)
        for a, ink in pens:
            od = od + (a[..., None] if isinstance(a, np.ndarray) else a) * ink
        return np.clip(_GLASS * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)

    def _stain(self, view: _View) -> tuple[np.ndarray | float, np.ndarray]:
        """Eosin and haematoxylin concentrations (h, w) of the tissue in `view` (0 on glass)."""
        h, w = view.h, view.w
        strength = view.alpha(self.index["tissue"])
        if "faint" in self.index:
            faint = view.alpha(self.index["faint"])
            if not (isinstance(faint, float) and faint == 0.0):
                strength = strength + _FAINT * faint * (1 - strength)
        if isinstance(strength, float) and strength == 0.0:
            return 0.0, np.zeros((h, w), np.float32)
        d, iy0, ix0 = view.d, view.iy0, view.ix0
        v4, bc = view.v4, view.bc
        e1 = v4(self.fibre[0].window(d, iy0, ix0, h, w))
        e2 = v4(self.fibre[1].window(d, iy0, ix0, h, w))
        conc_e = (e1 + bc(view.smooth(self.index["orient"])) * (e2 - e1)) * bc(
            view.smooth(self.index["stain"])
        )
        present = v4(self.nuc_rank.window(d, iy0, ix0, h, w)) < bc(view.smooth(self.index["density"]))
        conc_h = np.where(present, v4(self.nuc_conc.window(d, iy0, ix0, h, w)), np.float32(0.0)) + 0.04
        if "tumour" in self.index:
            tum_e, tum_h = self.tum_e, self.tum_h
            assert tum_e is not None and tum_h is not None  # made together with the tumour field
            tum = view.alpha(self.index["tumour"])
            if isinstance(tum, np.ndarray):
                tum4 = v4(tum)
                conc_e = conc_e + tum4 * (v4(tum_e.window(d, iy0, ix0, h, w)) - conc_e)
                conc_h = conc_h + tum4 * (v4(tum_h.window(d, iy0, ix0, h, w)) - conc_h)
            elif tum == 1.0:
                conc_e = v4(tum_e.window(d, iy0, ix0, h, w))
                conc_h = v4(tum_h.window(d, iy0, ix0, h, w))
        if isinstance(strength, np.ndarray):
            conc_e = conc_e * v4(strength)
            conc_h = conc_h * v4(strength)
        return np.reshape(conc_e, (h, w)), np.reshape(conc_h, (h, w))

    def render_level_tiles(self, downsample: int, width: int, height: int) -> Iterator[np.ndarray]:
        """Full tile-sized RGB tiles of one level in row-major order, rendered a row segment at a time."""
        t = self.spec.tile
        per_chunk = max(1, _MAX_CHUNK_W // t)
        for ty in range(0, height, t):
            for tx0 in range(0, width, t * per_chunk):
                n = min(per_chunk, math.ceil((width - tx0) / t))
                block = self._render(tx0 * downsample, ty * downsample, n * t, t, downsample)
                for i in range(n):
                    yield np.ascontiguousarray(block[:, i * t : (i + 1) * t])


# --------------------------------------------------------------------------------------------------------
# writing


def _level_sizes(width: int, height: int) -> list[tuple[int, int, int]]:
    """(downsample, width, height) per pyramid level: factor 4 until the longer side is ≤ 1024."""
    levels = [(1, width, height)]
    while max(levels[-1][1], levels[-1][2]) > 1024:
        d = levels[-1][0] * 4
        levels.append((d, math.ceil(width / d), math.ceil(height / d)))
    return levels


def _overview(model: _SlideModel, max_side: int) -> tuple[np.ndarray, int]:
    """The whole slide at the smallest power-of-two downsample that fits in `max_side`."""
    w, h = model.spec.width, model.spec.height
    d = 1
    while max(w, h) / d > max_side:
        d *= 2
    return model._render(0, 0, max(1, w // d), max(1, h // d), d), d


def _label_image(seed: int) -> np.ndarray:
    """A slide label: white paper, a barcode and a few 'text' lines."""
    rng = np.random.default_rng([seed, 0x1ABE1])
    img = np.full((448, 384, 3), 250, np.uint8)
    x = 40
    while x < 344:
        bw = int(rng.integers(2, 9))
        if rng.random() < 0.55:
            img[40:200, x : x + bw] = 20
        x += bw
    for row in range(4):
        y = 240 + row * 45
        img[y : y + 22, 40 : 40 + int(rng.integers(120, 300))] = 60
    return img


def _aperio_description(spec: SlideSpec, level_w: int | None = None, level_h: int | None = None) -> str:
    w, h, t = spec.width, spec.height, spec.tile
    desc = f"{_APERIO_HEADER} \r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t})"
    if level_w is not None:
        desc += f" -> {level_w}x{level_h}"
    desc += f" JPEG/RGB Q={spec.jpeg_quality}"
    if spec.mpp is not None:
        app_mag = 10.0 / spec.mpp
        mag = str(round(app_mag)) if abs(app_mag - round(app_mag)) < 1e-9 else f"{app_mag:g}"
        desc += f"|AppMag = {mag}|MPP = {spec.mpp:g}"
    desc += "|Filename = synthetic|Title = slidestream synthetic slide"
    return desc


def _ome_metadata(spec: SlideSpec) -> dict[str, Any]:
    if spec.mpp is None:
        return {"axes": "YXS"}
    size = {"PhysicalSizeX": spec.mpp, "PhysicalSizeY": spec.mpp}
    return {"axes": "YXS", **size, "PhysicalSizeXUnit": "µm", "PhysicalSizeYUnit": "µm"}


def write_slide(path: str | os.PathLike, spec: SlideSpec) -> SlideTruth:
    """Write one pyramidal tiled-JPEG slide to a local file (a folder of instances for DICOM-WSI); return
    its truth. Formats: Aperio SVS, generic TIFF (mpp in resolution tags), OME-TIFF (mpp in the OME-XML
    physical size), Hamamatsu NDPI (mpp in resolution tags), DICOM-WSI (mpp in the pixel spacing)."""
    model = _SlideModel(spec)
    levels = _level_sizes(spec.width, spec.height)
    t = spec.tile
    if spec.fmt == "dicom":
        ids = SeriesIds.derived(spec.seed)
        write_dicom_series(path, levels, model.render_level_tiles, t, spec.mpp, spec.jpeg_quality, ids)
        return model.truth
    if spec.fmt == "ndpi":
        macro = _macro_image(model)
        write_ndpi(path, levels, model.render_level_tiles, t, spec.mpp, spec.jpeg_quality, macro)
        return model.truth
    common: dict[str, Any] = {
        "dtype": np.uint8,
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": spec.jpeg_quality},
        "metadata": None,
        "software": "slidestream.synthetic",
    }
    bigtiff = spec.width * spec.height * 3 > 2**31
    with tifffile.TiffWriter(os.fspath(path), bigtiff=bigtiff, ome=spec.fmt == "ome-tiff") as tif:
        if spec.fmt == "svs":
            d0, w0, h0 = levels[0]
            tif.write(
                model.render_level_tiles(d0, w0, h0),
                shape=(h0, w0, 3),
                tile=(t, t),
                subfiletype=0,
                description=_aperio_description(spec),
                **common,
            )
            thumb, _ = _overview(model, 1024)
            tif.write(
                thumb,
                rowsperstrip=16,
                subfiletype=0,
                description=f"{_APERIO_HEADER} \r\n{spec.width}x{spec.height} -> "
                f"{thumb.shape[1]}x{thumb.shape[0]} - ",
                **common,
            )
            for d, lw, lh in levels[1:]:
                tif.write(
                    model.render_level_tiles(d, lw, lh),
                    shape=(lh, lw, 3),
                    tile=(t, t),
                    subfiletype=0,
                    description=_aperio_description(spec, lw, lh),
                    **common,
                )
            label = _label_image(spec.seed)
            tif.write(
                label,
                subfiletype=1,
                photometric="rgb",
                compression="lzw",
                metadata=None,
                rowsperstrip=64,
                software=common["software"],
                description=f"{_APERIO_HEADER}\r\nlabel {label.shape[1]}x{label.shape[0]}",
            )
            macro = _macro_image(model)
            tif.write(
                macro,
                subfiletype=9,
                rowsperstrip=16,
                description=f"{_APERIO_HEADER}\r\nmacro {macro.shape[1]}x{macro.shape[0]}",
                **common,
            )
        elif spec.fmt in ("tiff", "ome-tiff"):
            for i, (d, lw, lh) in enumerate(levels):
                extra: dict = {}
                if spec.mpp is not None and spec.fmt == "tiff":
                    px_per_cm = 1e4 / (spec.mpp * d)
                    extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
                if i == 0:
                    extra["subifds"] = len(levels) - 1
                    if spec.fmt == "ome-tiff":
                        extra["metadata"] = _ome_metadata(spec)
                tif.write(
                    model.render_level_tiles(d, lw, lh),
                    shape=(lh, lw, 3),
                    tile=(t, t),
                    subfiletype=0 if i == 0 else 1,
                    **{**common, **extra},
                )
        else:
            raise ValueError(f"unknown slide format {spec.fmt!r}")
    return model.truth


def _macro_image(model: _SlideModel) -> np.ndarray:
    """Photo of the whole glass slide: the tissue overview with a label area on the left."""
    overview, _ = _overview(model, 512)
    h, w, _ = overview.shape
    label_w = max(16, w // 3)
    macro = np.empty((h, w + label_w, 3), np.uint8)
    macro[:, :label_w] = (205, 200, 190)
    macro[:, label_w:] = overview
    return macro


def _mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_slides_in_parallel(paths: list[str], specs: list[SlideSpec]) -> list[SlideTruth]:
    workers = min(len(paths), os.cpu_count() or 1)
    if workers <= 1:
        return [write_slide(path, spec) for path, spec in zip(paths, specs, strict=True)]
    # spawn, not fork: the caller may hold threads (Ray, s3fs) that a forked child would inherit half-way
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(write_slide, paths, specs))


def site_staining(seed: int, site: int) -> Staining:
    """A lab's H&E: stain vectors tilted from the reference ones and concentration gains, drawn per site."""
    rng = np.random.default_rng([seed, site, 0x517E])

    def tilt(vector: tuple[float, float, float], sd: float) -> tuple[float, float, float]:
        v = np.clip(np.array(vector) + rng.normal(0, sd, 3), 0.05, None)
        r, g, b = (float(x) for x in v / np.linalg.norm(v))
        return r, g, b

    return Staining(
        h_od=tilt(DEFAULT_STAINING.h_od, 0.12),
        e_od=tilt(DEFAULT_STAINING.e_od, 0.12),
        h_gain=float(rng.uniform(0.6, 1.5)),
        e_gain=float(rng.uniform(0.6, 1.5)),
    )


def _slide_staining(site: Staining, rng: np.random.Generator) -> Staining:
    """One slide's jitter around its site's staining (section thickness, staining time)."""
    return Staining(
        h_od=site.h_od,
        e_od=site.e_od,
        h_gain=site.h_gain * float(rng.uniform(0.9, 1.1)),
        e_gain=site.e_gain * float(rng.uniform(0.9, 1.1)),
    )


def cohort_specs(
    n_slides: int,
    seed: int = 0,
    size: str = "tiny",
    fmt: str = "svs",
    positive_fraction: float = 0.5,
    pen_marks: bool = True,
    difficulty: str = "easy",
    sites: int = HARD_SITES,
    tumour_cover: tuple[float, float] = HARD_TUMOUR_COVER,
) -> list[CohortSlide]:
    """The slides of a labelled cohort: exactly round(n * positive_fraction) positives, shuffled by `seed`.

    With `pen_marks`, about a third of the slides carry pen strokes; about a quarter carry an extra faint
    tissue piece. A hard cohort spreads its slides over `sites` stainings (slide i at site i % sites, so
    sites are independent of labels), matches tumour to normal tissue's mean stain, and draws each positive
    slide's tumour fraction of tissue log-uniformly in `tumour_cover`.
    """
    if size not in SIZES:
        raise SynthError(f"unknown size {size!r}; choose from {sorted(SIZES)}")
    if fmt not in SLIDE_FORMATS:
        raise SynthError(f"unknown slide format {fmt!r}; choose from {', '.join(SLIDE_FORMATS)}")
    if difficulty not in DIFFICULTIES:
        raise SynthError(f"unknown difficulty {difficulty!r}; choose from {', '.join(DIFFICULTIES)}")
    lo, hi = tumour_cover
    if not 0 < lo <= hi < 1:
        raise SynthError(f"tumour cover {lo:g} {hi:g}: needs 0 < low <= high < 1")
    if sites < 1:
        raise SynthError(f"sites must be at least 1, not {sites}")
    width, height = SIZES[size]
    hard = difficulty == "hard"
    n_pos = min(n_slides, max(0, round(n_slides * positive_fraction)))
    labels = np.array([1] * n_pos + [0] * (n_slides - n_pos))
    np.random.default_rng([seed, 0xDA7A]).shuffle(labels)
    stainings = [site_staining(seed, site) for site in range(sites)] if hard else []
    cohort = []
    for i, label in enumerate(labels.tolist()):
        slide_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        choice = np.random.default_rng(slide_seed).random(3)
        spec = SlideSpec(
            width=width,
            height=height,
            mpp=0.25,
            fmt=fmt,  # type: ignore[arg-type]
            positive=bool(label),
            n_pieces=2 + int(choice[0] * 3),
            pen_marks=pen_marks and choice[1] < 0.35,
            faint_tissue=choice[2] < 0.25,
            seed=slide_seed,
        )
        site = 0
        if hard:
            site = i % sites
            hard_rng = np.random.default_rng([slide_seed, 0x4A2D])
            cover = float(lo * (hi / lo) ** hard_rng.random())
            spec = replace(
                spec,
                staining=_slide_staining(stainings[site], hard_rng),
                tumour_cover=cover,
                tumour_matched=True,
            )
        cohort.append(CohortSlide(spec, site))
    return cohort


def write_dataset(
    out: str,
    n_slides: int,
    seed: int = 0,
    size: str = "tiny",
    fmt: str = "svs",
    positive_fraction: float = 0.5,
    pen_marks: bool = True,
    storage_options: dict | None = None,
    difficulty: str = "easy",
    sites: int = HARD_SITES,
    tumour_cover: tuple[float, float] = HARD_TUMOUR_COVER,
) -> SynthDataset:
    """Write a labelled cohort (`cohort_specs`): slides, ground-truth masks, labels.csv and synth.json.

    `out` is a local directory or an fsspec URI (s3://bucket/prefix). Every two slides share one patient;
    labels.csv also names each slide's site.
    """
    cohort = cohort_specs(
        n_slides, seed, size, fmt, positive_fraction, pen_marks, difficulty, sites, tumour_cover
    )
    specs = [slide.spec for slide in cohort]
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    local = isinstance(fs, LocalFileSystem)
    if local:
        root = os.path.abspath(root)
        fs.makedirs(posixpath.join(root, "masks"), exist_ok=True)

    def uri_of(name: str) -> str:
        return posixpath.join(root, name) if local else f"{out.rstrip('/')}/{name}"

    names = [_FILE_NAMES[fmt].format(f"slide_{i:03d}") for i in range(n_slides)]
    with tempfile.TemporaryDirectory(prefix="slidestream-synth-") as staging:
        # Slides are written locally (in place, or staged for upload), one process per core: each slide
        # is seconds of JPEG encoding. Seeds are per slide, so the files do not depend on the pool.
        targets = [posixpath.join(root if local else staging, name) for name in names]
        truths = _write_slides_in_parallel(targets, specs)
        slide_ids, uris, entries = [], [], []
        for name, target, truth, slide in zip(names, targets, truths, cohort, strict=True):
            slide_id = slide_id_from_uri(name)
            if not local:
                fs.put(target, posixpath.join(root, name), recursive=fmt == "dicom")
            fs.pipe_file(
                posixpath.join(root, "masks", f"{slide_id}.tumour.png"), _mask_png(truth.tumour_mask)
            )
            fs.pipe_file(
                posixpath.join(root, "masks", f"{slide_id}.tissue.png"), _mask_png(truth.tissue_mask)
            )
            slide_ids.append(slide_id)
            uris.append(uri_of(name))
            entry: dict[str, Any] = {"slide_id": slide_id, "file": name, "label": int(slide.spec.positive)}
            entry["site"] = slide.site
            if difficulty == "hard":
                entry["tumour_cover"] = slide.spec.tumour_cover if slide.spec.positive else 0.0
                entry["staining"] = asdict(slide.spec.staining)
            entries.append(entry)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["slide_id", "label", "patient_id", "site"])
    for i, entry in enumerate(entries):
        writer.writerow([entry["slide_id"], entry["label"], f"patient_{i // 2:03d}", f"site_{entry['site']}"])
    labels_path = posixpath.join(root, "labels.csv")
    fs.pipe_file(labels_path, buf.getvalue().encode())
    meta = {
        "seed": seed,
        "size": size,
        "fmt": fmt,
        "mpp": 0.25,
        "difficulty": difficulty,
        "mask_downsample": MASK_DOWNSAMPLE,
        "slides": entries,
    }
    fs.pipe_file(posixpath.join(root, "synth.json"), (json.dumps(meta, indent=2) + "\n").encode())
    return SynthDataset(
        uris=uris,
        labels_uri=uri_of("labels.csv"),
        slide_ids=slide_ids,
        labels=[int(slide.spec.positive) for slide in cohort],
        sites=[slide.site for slide in cohort],
    )


@dataclass
class LabelledTiles:
    """Tiles rendered in memory with their ground truth (no slide file involved)."""

    images: np.ndarray  # (n, px, px, 3) uint8
    tumour_fraction: np.ndarray  # (n,) float32: share of the tile's mask cells that are tumour
    tissue_fraction: np.ndarray  # (n,) float32


def sample_tiles(
    spec: SlideSpec, n_tiles: int, tile_px: int, mpp: float, seed: int, tumour_share: float = 0.0
) -> LabelledTiles:
    """`n_tiles` tiles of `tile_px` at `mpp` drawn on one slide's tissue, with their tumour fraction.

    Tiles sit at random positions where at least half the tile is tissue; with `tumour_share`, that share
    of them is centred on tumour cells (when the slide has any), the rest anywhere on tissue.
    """
    if spec.mpp is None:
        raise ValueError("sample_tiles needs a slide with an mpp")
    model = _SlideModel(spec)
    truth = model.truth
    d = mpp / spec.mpp
    side = tile_px * d  # level-0 px per tile
    cells = max(1, math.ceil(side / _G))
    rng = np.random.default_rng([seed, 0x711E])
    tissue = truth.tissue_mask
    candidates = np.argwhere(tissue)
    tumour_cells = np.argwhere(truth.tumour_mask)
    if not len(candidates):
        raise ValueError(f"slide seed {spec.seed} has no tissue to sample tiles from")
    images = np.empty((n_tiles, tile_px, tile_px, 3), np.uint8)
    tumour_fraction = np.empty(n_tiles, np.float32)
    tissue_fraction = np.empty(n_tiles, np.float32)
    made = 0
    for _ in range(50 * n_tiles):
        if made == n_tiles:
            break
        pool = tumour_cells if len(tumour_cells) and rng.random() < tumour_share else candidates
        cy, cx = pool[rng.integers(len(pool))]
        x0 = float(np.clip((cx + 0.5) * _G - side / 2, 0, spec.width - side))
        y0 = float(np.clip((cy + 0.5) * _G - side / 2, 0, spec.height - side))
        gx0, gy0 = int(x0 // _G), int(y0 // _G)
        window = (slice(gy0, gy0 + cells), slice(gx0, gx0 + cells))
        tissue_share = float(tissue[window].mean())
        if tissue_share < 0.5:
            continue
        images[made] = model._render(x0, y0, tile_px, tile_px, d)
        tumour_fraction[made] = float(truth.tumour_mask[window].mean())
        tissue_fraction[made] = tissue_share
        made += 1
    if made < n_tiles:
        raise ValueError(f"slide seed {spec.seed}: found tissue for {made} of {n_tiles} tiles")
    return LabelledTiles(images, tumour_fraction, tissue_fraction)
