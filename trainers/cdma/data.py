"""CDMA training data: tiles from the committed shards with their masks rasterised from the slides'
annotations, the slide split (held-out test, validation, labelled fraction, unlabelled rest), batches of
half labelled and half unlabelled tiles, and the spec's augmentations."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from slidestream.cluster.config import LabelledSlides, TilingConfig
from slidestream.pipelines.annotations import Region, SlideAnnotation
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.shards import decode_sample, iter_shard_samples
from slidestream.pipelines.tile_store import committed_tiles, shard_uris, slide_mpp, tiles_stage
from slidestream.trainers.data import TrainDataError

__all__ = [
    "SegSplit",
    "TileSet",
    "augment",
    "half_batches",
    "load_tiles",
    "normalise",
    "split_slides",
    "standardise",
    "steps_per_epoch",
    "to_unit",
    "training_batch",
    "unlabelled_stream",
]

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
    labelled_slides: LabelledSlides = "stratified",
    site_of: Mapping[str, str] | None = None,
) -> SegSplit:
    """Stratified by whether a slide's annotation has any foreground, so each annotated role gets
    foreground slides when there are any. `foreground`: annotated slide → has foreground.

    `labelled_slides="foreground"` labels foreground slides first (background-only ones only when those run
    out); the background-only slides not taken then train unlabelled. With one or two labelled slides, a
    background-only one cost held-out Dice in 3 of 4 measured splits (bench/RESULTS.md).

    `site_of` (slide → site) spreads the labelled slides over sites: foreground slides, like background-only
    ones, are taken one site after another. Two tumour slides of one site did not carry the segmentation
    to another site's stain where two of different sites did (bench/RESULTS.md)."""
    rng = random.Random(seed)
    pos = sorted(s for s, fg in foreground.items() if fg)
    neg = sorted(s for s, fg in foreground.items() if not fg)
    rng.shuffle(pos)
    rng.shuffle(neg)

    def take(n: int, foreground_first: bool = False) -> list[str]:
        total = len(pos) + len(neg)
        stratified = max(1 if pos else 0, round(n * len(pos) / max(total, 1)))
        k_pos = min(len(pos), n if foreground_first else stratified, n)
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
    if site_of is not None:
        pos[:], neg[:] = _spread_over_sites(pos, site_of), _spread_over_sites(neg, site_of)
    n_labelled = min(annotated_pool, max(1, round(labelled_frac * pool)))
    labelled = take(n_labelled, foreground_first=labelled_slides == "foreground")
    val = take(val_slides)
    return SegSplit(labelled, sorted(pos + neg + list(unannotated)), val, test)


def _spread_over_sites(slides: list[str], site_of: Mapping[str, str]) -> list[str]:
    """`slides` reordered to take one slide of each site in turn (sites in order of first appearance, each
    site's slides in their order); slides without a site count as one site of their own each."""
    by_site: dict[str, list[str]] = {}
    for slide in slides:
        by_site.setdefault(site_of.get(slide, f"\0{slide}"), []).append(slide)
    queues = list(by_site.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


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
    """`steps` pairs (labelled indices, unlabelled indices) of `half` each for this rank.

    A global step takes `half` tiles per rank from each part, rank r the r-th run of them. The labelled
    part is permuted once per epoch (the same on every rank); the unlabelled part is one stream of
    permutations that runs on across epochs without restarting, so a resumed epoch draws the same tiles."""
    lab = np.random.default_rng([seed, epoch]).permutation(n_labelled)
    for step in range(steps):
        start = (step * world + rank) * half
        positions = np.arange(start, start + half)
        unl_start = (epoch * steps * world) * half + start
        unl = unlabelled_stream(n_unlabelled, seed, np.arange(unl_start, unl_start + half))
        yield lab[positions % n_labelled], unl


def unlabelled_stream(n: int, seed: int, positions: np.ndarray) -> np.ndarray:
    """The unlabelled indices at `positions` of an endless chain of permutations of range(n) (pass k is
    permuted by seed and k): every tile once per pass, wherever an epoch boundary falls."""
    if not n:
        return np.zeros(0, np.int64)
    passes = positions // n
    out = np.empty(len(positions), np.int64)
    for k in np.unique(passes):
        here = passes == k
        out[here] = np.random.default_rng([seed, 1, int(k)]).permutation(n)[positions[here] % n]
    return out


def steps_per_epoch(n_labelled: int, half: int, world: int, fixed: int | None) -> int:
    """Steps of one epoch (or `fixed`): one pass over the labelled tiles, as the official sampler counts
    them (len(labelled) // labelled per batch, the remainder dropped), where a global batch holds `half`
    labelled tiles from each of `world` workers; at least one step."""
    return fixed or max(1, n_labelled // (half * world))


def to_unit(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [0, 1] (where the augmentations work)."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255


def standardise(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images → ImageNet mean/std, the encoder's input."""
    return (x - _MEAN.to(x.device)) / _STD.to(x.device)


def normalise(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) → the encoder's input (no augmentation: validation and inference)."""
    return standardise(to_unit(images, device))


def augment(
    x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator, noise_std: float, noise_p: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per image in [0, 1] (before `standardise`, as the official code adds its noise): random horizontal
    and vertical flips, a random multiple of 90° rotation (the mask moves with the image), and Gaussian
    noise (σ `noise_std`, unclipped) with probability `noise_p`."""
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


def training_batch(
    labelled: TileSet,
    unlabelled: TileSet | None,
    lab_idx: np.ndarray,
    unl_idx: np.ndarray,
    gen: torch.Generator,
    noise_std: float,
    noise_p: float,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's encoder input (labelled tiles first, then unlabelled ones when given) and the labelled
    masks: augmented in [0, 1], standardised last."""
    assert labelled.masks is not None
    x, y = augment(
        to_unit(labelled.images[lab_idx], device),
        torch.from_numpy(labelled.masks[lab_idx]).to(device).long(),
        gen, noise_std, noise_p,
    )  # fmt: skip
    assert y is not None  # the masks went in, so they come out
    if unlabelled is not None:
        xu, _ = augment(to_unit(unlabelled.images[unl_idx], device), None, gen, noise_std, noise_p)
        x = torch.cat([x, xu])
    return standardise(x), y
