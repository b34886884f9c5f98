"""CDMA training data: tiles from the committed shards with their masks rasterised from the slides'
annotations, the slide split (held-out test, validation, labelled fraction, unlabelled rest), batches of
half labelled and half unlabelled tiles, and the spec's augmentations."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch

from slidestream.cluster.config import TilingConfig
from slidestream.pipelines.annotations import Region, SlideAnnotation
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.shards import decode_sample, iter_shard_samples
from slidestream.pipelines.tile_store import committed_tiles, shard_uris, slide_mpp, tiles_stage
from slidestream.trainers.data import TrainDataError

__all__ = ["SegSplit", "TileSet", "augment", "half_batches", "load_tiles", "normalise", "split_slides"]

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@dataclass
class SegSplit:
    """Slides by role. Test and validation slides are annotated and never trained on."""

    labelled: list[str]
    unlabelled: list[str]
    val: list[str]
    test: list[str]

    def to_dict(self) -> dict[str, list[str]]:
        return asdict(self)


def split_slides(
    foreground: dict[str, bool],
    unannotated: list[str],
    labelled_frac: float,
    test_frac: float,
    val_slides: int,
    seed: int,
) -> SegSplit:
    """Stratified by whether a slide's annotation has any foreground, so each annotated role gets
    foreground slides when there are any. `foreground`: annotated slide → has foreground."""
    rng = random.Random(seed)
    pos = sorted(s for s, fg in foreground.items() if fg)
    neg = sorted(s for s, fg in foreground.items() if not fg)
    rng.shuffle(pos)
    rng.shuffle(neg)

    def take(n: int) -> list[str]:
        total = len(pos) + len(neg)
        k_pos = min(len(pos), max(1 if pos else 0, round(n * len(pos) / max(total, 1))), n)
        k_neg = min(len(neg), n - k_pos)
        chosen = pos[:k_pos] + neg[:k_neg]
        del pos[:k_pos], neg[:k_neg]
        return sorted(chosen)

    n_annotated = len(foreground)
    n_test = max(1, round(test_frac * n_annotated))
    if n_annotated < n_test + val_slides + 1:
        raise TrainDataError(
            f"cdma: {n_annotated} annotated slide(s) cannot give {n_test} test, {val_slides} validation "
            "and at least one labelled slide; annotate more slides or lower cdma.test_frac / cdma.val_slides"
        )
    test = take(n_test)
    annotated_pool = len(pos) + len(neg) - val_slides  # labelled slides come before validation ones
    pool = annotated_pool + len(unannotated)
    labelled = take(min(annotated_pool, max(1, round(labelled_frac * pool))))
    val = take(val_slides)
    return SegSplit(labelled, sorted(pos + neg + list(unannotated)), val, test)


@dataclass
class TileSet:
    """Tiles (N, px, px, 3) uint8, masks (N, px, px) uint8 class indices (None when unlabelled)."""

    images: np.ndarray
    masks: np.ndarray | None
    slide_ids: list[str]

    def __len__(self) -> int:
        return len(self.images)


def load_tiles(
    out: str,
    tiling: TilingConfig,
    slide_ids: list[str],
    annotations: dict[str, SlideAnnotation] | None,
    min_tissue_frac: float,
) -> TileSet:
    """The slides' committed tiles with at least `min_tissue_frac` tissue (background dropped), with masks
    rasterised onto each tile when `annotations` is given."""
    tiles = committed_tiles(Ledger(out), tiling)
    shards = {sid: shard_uris(out, tiling, entry) for sid, entry in tiles.items()}
    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    owners: list[str] = []
    for slide_id in slide_ids:
        if slide_id not in shards:
            raise TrainDataError(
                f"slide {slide_id} has no committed tiles under {out} ({tiles_stage(tiling)})"
            )
        for uri in shards[slide_id]:
            for sample in iter_shard_samples(uri):
                meta = _meta(sample, uri)
                if meta["tissue_frac"] < min_tissue_frac:
                    continue
                image = decode_sample(sample)
                images.append(image)
                owners.append(slide_id)
                if annotations is not None:
                    side0 = meta["tile_px"] * meta["mpp"] / slide_mpp(tiles[slide_id])
                    scale = side0 / image.shape[0]
                    region = Region(meta["x"], meta["y"], image.shape[1], image.shape[0], scale)
                    masks.append(annotations[slide_id].region(region))
    if not images:
        raise TrainDataError(f"no tile with tissue_frac ≥ {min_tissue_frac} in slides {slide_ids[:5]}")
    return TileSet(np.stack(images), np.stack(masks) if annotations is not None else None, owners)


def _meta(sample: dict, uri: str) -> dict:
    import json

    try:
        meta = json.loads(sample["json"])
        return {k: meta[k] for k in ("x", "y", "mpp", "tile_px", "tissue_frac")}
    except (KeyError, ValueError) as exc:
        raise TrainDataError(
            f"shard {uri}: sample {sample.get('__key__')} has bad metadata ({exc})"
        ) from None


def half_batches(
    n_labelled: int, n_unlabelled: int, half: int, steps: int, seed: int, epoch: int, rank: int, world: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`steps` pairs (labelled indices, unlabelled indices) of `half` each for this rank: per-epoch
    permutations (the same on every rank), cycled, every rank taking its own positions."""
    rng = np.random.default_rng([seed, epoch])
    lab = rng.permutation(n_labelled)
    unl = rng.permutation(n_unlabelled) if n_unlabelled else np.zeros(0, np.int64)
    for step in range(steps):
        start = (step * world + rank) * half
        positions = np.arange(start, start + half)
        yield lab[positions % n_labelled], (unl[positions % n_unlabelled] if n_unlabelled else unl)


def steps_per_epoch(n_labelled: int, n_unlabelled: int, half: int, world: int, fixed: int | None) -> int:
    """Steps covering the larger of the two parts once per epoch (or `fixed`)."""
    return fixed or max(1, math.ceil(max(n_labelled, n_unlabelled) / (half * world)))


def normalise(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W), ImageNet mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255
    return (x - _MEAN.to(device)) / _STD.to(device)


def augment(
    x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator, noise_std: float, noise_p: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per image: random horizontal and vertical flips, a random multiple of 90° rotation (the mask moves
    with the image), and Gaussian noise (σ `noise_std`) with probability `noise_p`."""
    draws = torch.rand(len(x), 3, generator=gen)
    turns = torch.randint(0, 4, (len(x),), generator=gen)
    xs, ys = [], []
    for i in range(len(x)):
        xi, yi = x[i], (y[i] if y is not None else None)
        dims = [d for d, flip in ((-1, draws[i, 0] < 0.5), (-2, draws[i, 1] < 0.5)) if flip]
        if dims:
            xi = xi.flip(dims)
            yi = yi.flip(dims) if yi is not None else None
        k = int(turns[i])
        xi = torch.rot90(xi, k, (-2, -1))
        yi = torch.rot90(yi, k, (-2, -1)) if yi is not None else None
        if draws[i, 2] < noise_p:
            xi = xi + noise_std * torch.randn(xi.shape, generator=gen).to(xi.device)
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), (torch.stack([yi for yi in ys if yi is not None]) if y is not None else None)
