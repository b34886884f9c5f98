"""Pretrain a small tile encoder (`resnet10t_64`, or `resnet18_64` whose state dict CDMA's light network
also loads) on synthetic tissue, so that methods built on tile features have features that carry
morphology (a random network's do not survive augmentation).

The tiles come from a hard synthetic cohort rendered in memory (stain varying by site and slide, tumour
of normal tissue's colour), 64 px at 2 µm/px. The network learns each tile's tumour fraction (the
generator's ground truth) through a linear head, under the Giga-SSL view augmentations (crop, colour
jitter, grey, blur) plus rotations and flips. That makes only the head's direction invariant: the other
feature dimensions follow the augmentation freely, so a slide's Giga-SSL views drawn under different
augmentations differ more than slides do. With `contrastive` > 0 each training tile is augmented twice,
independently, and a SimCLR term (NT-Xent over a small projection head, weighted by `contrastive`) asks
the two views of a tile to agree against the other tiles of the batch, the supervised loss being taken on
both views. It is off by default: at these budgets (~100 steps) the NT-Xent barely falls below chance and
the views stay as hard to match (bench/RESULTS.md, issue 23). A quarter of the slides is held out and the
tumour-vs-normal AUC of the head on their tiles is reported per epoch. The output is the backbone's plain
state dict (no heads), which `--encoder <name> --weights FILE` loads, and a JSON record beside it.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from slidestream.cluster.errors import UsageError
from slidestream.pipelines.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NATIVE_ENCODERS,
    RANDOM,
    encoder_info,
    trainable_backbone,
    weights_digest,
)
from slidestream.pipelines.gigassl_views import apply_view, draw_params
from slidestream.pipelines.synthetic import cohort_specs, sample_tiles
from slidestream.trainers.gigassl.ntxent import ntxent

log = logging.getLogger(__name__)

ENCODER = "resnet10t_64"  # the default: the tile-feature encoder of the learning tests and benches
TILE_PX = 64
TILE_MPP = 2.0
_AUG_GROUP = 16  # tiles that share one augmentation draw (drawing per tile costs more than the step)
_TAU = 0.2  # NT-Xent temperature of the tile-level contrastive term
_PROJECTION = (256, 64)  # the contrastive projection head: hidden and output width (dropped afterwards)


@dataclass(frozen=True)
class PretrainSettings:
    slides: int = 24  # synthetic slides drawn for pretraining (seeded apart from evaluation cohorts)
    tiles_per_slide: int = 96
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 1000  # the pretraining cohort's seed: keep it apart from the cohorts you evaluate on
    held_out: float = 0.25  # share of the slides kept out of training for the reported AUC
    encoder: str = ENCODER  # one of the native encoders (`NATIVE_ENCODERS`)
    # weight of the tile-level NT-Xent term (two augmentations of a tile agree; twice the forward cost);
    # 0 = supervised only, one view per tile
    contrastive: float = 0.0

    def check(self) -> None:
        if self.encoder not in NATIVE_ENCODERS:
            raise UsageError(
                f"pretrain-encoder: cannot train {self.encoder!r}; choose one of {', '.join(NATIVE_ENCODERS)}"
            )
        if self.slides < 4:
            raise UsageError(f"pretrain-encoder needs at least 4 slides, not {self.slides}")
        if self.tiles_per_slide < 8 or self.epochs < 1 or self.batch_size < 2:
            raise UsageError("pretrain-encoder needs ≥ 8 tiles per slide, ≥ 1 epoch and a batch of ≥ 2")
        if self.contrastive < 0:
            raise UsageError(f"the contrastive weight must be ≥ 0, not {self.contrastive}")
        if not 0 < self.held_out < 1:
            raise UsageError(f"held-out share {self.held_out} must be between 0 and 1")


@dataclass
class PretrainReport:
    weights: str
    key: str  # the features' key when this file embeds tiles
    settings: PretrainSettings
    counts: dict[str, int]  # training and held-out tiles, held-out slides
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def held_out_auc(self) -> float:
        return self.history[-1]["held_out_auc"]


def _tiles(settings: PretrainSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiles, their tumour fractions and slide indices: 3 in 4 slides positive, tumour 10-30 % of tissue,
    half of a positive slide's tiles centred on tumour."""
    cohort = cohort_specs(
        settings.slides,
        seed=settings.seed,
        positive_fraction=0.75,
        pen_marks=False,
        difficulty="hard",
        tumour_cover=(0.1, 0.3),
    )
    images, fractions, slides = [], [], []
    for index, slide in enumerate(cohort):
        tiles = sample_tiles(
            slide.spec, settings.tiles_per_slide, TILE_PX, TILE_MPP, seed=index, tumour_share=0.5
        )
        images.append(tiles.images)
        fractions.append(tiles.tumour_fraction)
        slides.append(np.full(len(tiles.images), index))
    return np.concatenate(images), np.concatenate(fractions), np.concatenate(slides)


def _augment(tiles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Giga-SSL view augmentations, one draw per group of tiles, then a random rotation and flip."""
    out = np.empty_like(tiles)
    for start in range(0, len(tiles), _AUG_GROUP):
        group = apply_view(tiles[start : start + _AUG_GROUP], draw_params(rng), TILE_PX)
        group = np.rot90(group, int(rng.integers(4)), axes=(1, 2))
        out[start : start + _AUG_GROUP] = group[:, :, ::-1] if rng.random() < 0.5 else group
    return out


def _normalise(tiles: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _held_out_auc(net: nn.Module, head: nn.Linear, tiles: np.ndarray, fractions: np.ndarray) -> float:
    """Tumour (≥ half the tile) against normal (none) on the held-out slides' tiles, un-augmented."""
    clear = (fractions >= 0.5) | (fractions == 0)
    net.eval()
    with torch.inference_mode():
        scores = torch.cat([head(net(_normalise(tiles[i : i + 256]))) for i in range(0, len(tiles), 256)])
    return float(roc_auc_score(fractions[clear] >= 0.5, scores.squeeze(1).numpy()[clear]))


def pretrain_tile_encoder(out: str | os.PathLike, settings: PretrainSettings) -> PretrainReport:
    """Train `settings.encoder` on synthetic tiles and write its state dict to `out` (and `out`.json)."""
    settings.check()
    started = time.perf_counter()
    rng = np.random.default_rng([settings.seed, 0x9E7])
    tiles, fractions, slide_of = _tiles(settings)
    n_held = max(1, round(settings.slides * settings.held_out))
    held = slide_of >= settings.slides - n_held
    if not ((fractions[held] >= 0.5).any() and (fractions[held] == 0).any()):
        raise UsageError("the held-out slides hold no tumour or no normal tiles; use more slides")
    train_tiles, train_fractions = tiles[~held], torch.from_numpy(fractions[~held])
    torch.manual_seed(settings.seed)
    net = trainable_backbone(settings.encoder)
    dim = encoder_info(settings.encoder, RANDOM).dim
    head = nn.Linear(dim, 1)
    parameters = [*net.parameters(), *head.parameters()]
    n_views = 2 if settings.contrastive > 0 else 1
    if n_views == 2:  # made after the head, so the network and head start as without it
        hidden, width = _PROJECTION
        projector = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))
        parameters += projector.parameters()
    optimiser = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=1e-4)
    steps = settings.epochs * -(-len(train_tiles) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, settings.lr, total_steps=steps)
    counts = {"train_tiles": len(train_tiles), "held_out_tiles": int(held.sum()), "held_out_slides": n_held}
    report = PretrainReport(str(out), "", settings, counts)
    for epoch in range(settings.epochs):
        net.train()
        order = rng.permutation(len(train_tiles))
        losses, contrastive = [], []
        for start in range(0, len(order), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            if n_views == 2 and len(batch) < 2:  # NT-Xent needs another tile for its negatives
                continue
            views = [_normalise(_augment(train_tiles[batch], rng)) for _ in range(n_views)]
            features = net(torch.cat(views))
            logits = head(features).squeeze(1)
            loss = F.binary_cross_entropy_with_logits(logits, train_fractions[batch].repeat(n_views))
            if n_views == 2:
                z1, z2 = projector(features).chunk(2)
                agree = ntxent(z1, z2, tau=_TAU)
                loss = loss + settings.contrastive * agree
                contrastive.append(float(agree.detach()))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        auc = _held_out_auc(net, head, tiles[held], fractions[held])
        entry = {"epoch": epoch, "loss": float(np.mean(losses)), "held_out_auc": auc}
        if contrastive:
            entry["ntxent"] = float(np.mean(contrastive))
        report.history.append(entry)
        agreement = f" (NT-Xent {entry['ntxent']:.3f})" if contrastive else ""
        log.info("epoch %d: loss %.3f%s, held-out tumour AUC %.3f", epoch, entry["loss"], agreement, auc)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    torch.save(net.state_dict(), staging)
    staging.replace(path)
    report.key = f"{settings.encoder}-{weights_digest(path)}"
    report.seconds = time.perf_counter() - started
    record = {**asdict(report), "encoder": settings.encoder, "tile_px": TILE_PX, "tile_mpp": TILE_MPP}
    path.with_name(path.name + ".json").write_text(json.dumps(record, indent=1) + "\n")
    return report
