"""ICMIL step 2 on Ray Train: tile-level data-parallel fine-tuning of the embedder (`icmil_distill` losses).

Tiles stream from the committed WebDataset shards of the TRAINING slides only: every epoch the shard list
is shuffled and dealt to the workers, each worker cycles through its shards, `open_shards` of them read
at once round-robin (a shard holds one slide: so a batch mixes slides, as the official code's shuffle of
all tiles does), through a bounded shuffle buffer, and every worker takes the same number of steps (each
step ends in a gradient all-reduce).
Validation tiles (the split's validation slides) only score epochs for model selection: the mean
absolute difference between the student's probabilities on an augmented view and the teacher's on the
clean tile. Rank 0 checkpoints every epoch (a restarted worker or a rerun resumes at the last epoch) and
finally writes the best student encoder as a state dict `build_encoder` loads (`encoder.pt`), then
`result.json` (last: its presence means the step is complete).
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from slidestream.cluster.storage import join, write_bytes_atomic
from slidestream.pipelines.embed import with_input_px
from slidestream.pipelines.encoders import TileEncoder, build_encoder
from slidestream.pipelines.shards import decode_sample, iter_shard_samples
from slidestream.trainers.dist import average_gradients, gather_objects, rank_and_world, shard_with_padding
from slidestream.trainers.icmil.distill import (
    DEFAULT_BETA,
    InstanceTeacher,
    augmented_view,
    distill_losses,
    make_student,
)
from slidestream.trainers.models import build_model
from slidestream.trainers.session import (
    bf16_autocast,
    load_weights,
    report_epoch,
    restore_state,
    train_device,
)

__all__ = ["ENCODER_FILE", "RESULT_FILE", "DistillJob", "finetune_embedder"]

log = logging.getLogger(__name__)

T = TypeVar("T")

ENCODER_FILE = "encoder.pt"
RESULT_FILE = "result.json"


@dataclass
class DistillJob:
    """Everything a worker needs for one round's fine-tuning (plain data: it travels to the workers)."""

    name: str
    encoder: str  # encoder name, e.g. resnet50_trunc
    encoder_weights: str  # the round's starting weights (a local file or "random")
    encoder_seed: int
    input_px: int | None  # embed.input_px
    model: str  # the bag classifier (abmil, maxpool, dtfd)
    model_options: dict[str, Any]
    mil_weights: str  # the frozen bag classifier of the previous round
    dim: int
    n_classes: int
    train_shards: list[str]
    val_shards: list[str]
    train_tiles: int  # tiles in the training shards (steps per epoch come from it)
    result_dir: str
    icmil: dict[str, Any]  # ICMILConfig as a dict
    seed: int = 0

    def to_config(self) -> dict[str, Any]:
        return asdict(self)


def build_teacher(job: DistillJob) -> InstanceTeacher:
    encoder = build_encoder(job.encoder, job.encoder_weights, job.encoder_seed)
    encoder.info = with_input_px(encoder.info, job.input_px)
    mil = build_model(job.model, job.dim, job.n_classes, **job.model_options)
    mil.load_state_dict(load_weights(job.mil_weights))
    return InstanceTeacher.from_mil(encoder, mil, job.model, confidence=job.icmil["confidence"])


def lr_milestones(icmil: dict[str, Any]) -> list[int]:
    """Epochs at which the fine-tuning's learning rate is multiplied by `lr_gamma`: `lr_milestones`, or
    when null, [100] with confidence weights and none without (the official scripts' MultiStepLR)."""
    if icmil["lr_milestones"] is not None:
        return list(icmil["lr_milestones"])
    return [100] if icmil["confidence"] else []


def epoch_lr(base: float, milestones: list[int], gamma: float, epoch: int) -> float:
    """The learning rate of `epoch` (0-based) under MultiStepLR stepped once per epoch."""
    return base * gamma ** sum(epoch >= m for m in milestones)


def interleave(streams: Iterator[Iterator[T]], width: int) -> Iterator[T]:
    """The items of `streams`, round-robin over `width` of them at a time; the next stream opens when one
    ends (streams are opened lazily, so at most `width` are open)."""
    active = deque(itertools.islice(streams, width))
    while active:
        stream = active.popleft()
        for item in stream:
            yield item
            active.append(stream)
            break
        else:
            active.extend(itertools.islice(streams, 1))


def tile_stream(
    shards: list[str], seed: int, epoch: int, buffer: int, width: int, cycle: bool = True
) -> Iterator[np.ndarray]:
    """This rank's tiles (uint8 HWC): its share of a per-epoch shuffle of `shards`, `width` shards read at
    once round-robin and shuffled through a buffer of `buffer` tiles; with `cycle`, endless (the shards
    are read again)."""
    rank, world = rank_and_world()
    mine = shard_with_padding(shards, seed, epoch, rank, world) if shards else []
    rng = random.Random(seed * 7_919 + epoch * 104_729 + rank)
    passes = itertools.count() if cycle else range(1)
    held: list[np.ndarray] = []
    for _ in passes:
        read = 0
        for sample in interleave((iter_shard_samples(uri) for uri in mine), width):
            held.append(decode_sample(sample))
            read += 1
            if len(held) >= buffer:
                yield held.pop(rng.randrange(len(held)))
        if read == 0:
            break
    rng.shuffle(held)
    yield from held


def _batches(tiles: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    while batch := list(itertools.islice(tiles, size)):
        yield np.stack(batch)


class Views:
    """Clean (teacher) and augmented (student) normalised views of uint8 tiles."""

    def __init__(self, encoder: TileEncoder, scale_min: float, device: torch.device) -> None:
        self.encoder, self.scale_min, self.device = encoder, scale_min, device
        self.mean = torch.tensor(encoder.info.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(encoder.info.std, device=device).view(1, 3, 1, 1)

    def __call__(self, tiles: np.ndarray, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.from_numpy(tiles).to(self.device)
        clean = self.encoder.preprocess(batch)
        x01 = batch.permute(0, 3, 1, 2).float().div_(255.0)
        aug = augmented_view(x01, self.encoder.info.input_px, self.scale_min, generator)
        return clean, ((aug - self.mean) / self.std).contiguous()


@torch.no_grad()
def validation_mae(teacher: InstanceTeacher, student: Any, views: Views, job: DistillJob) -> float:
    """Mean |p_student(augmented) − p_teacher(clean)| over up to `val_tiles` validation tiles (fixed
    augmentations, every rank a share of the shards)."""
    _, world = rank_and_world()
    cfg = job.icmil
    student.eval()
    generator = torch.Generator().manual_seed(job.seed + 17)
    limit = math.ceil(cfg["val_tiles"] / world)
    tiles = itertools.islice(
        tile_stream(job.val_shards, job.seed, 0, 1, cfg["open_shards"], cycle=False), limit
    )
    total, count = 0.0, 0
    for batch in _batches(tiles, cfg["batch_size"]):
        clean, aug = views(batch, generator)
        with bf16_autocast(views.device):
            p_t = torch.softmax(teacher.head(teacher.reduction(teacher.encoder(clean))).float(), dim=-1)
            p_s = torch.softmax(student.head(student.reduction(student.encoder(aug))).float(), dim=-1)
        total += float((p_s - p_t).abs().mean(dim=1).sum())
        count += len(batch)
    student.train()
    parts = gather_objects((total, count))
    n = sum(c for _, c in parts)
    return sum(t for t, _ in parts) / n if n else math.nan


def _save(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def finetune_embedder(config: dict[str, Any]) -> None:
    """The Ray Train loop of one round's fine-tuning (every worker runs it)."""
    job = DistillJob(**config)
    cfg = job.icmil
    rank, world = rank_and_world()
    device = train_device()
    teacher = build_teacher(job).to(device)
    torch.manual_seed(job.seed)
    student = make_student(teacher).to(device)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    beta = None
    if cfg["confidence"]:
        beta = cfg["beta"] or DEFAULT_BETA.get(job.model)
        if beta is None:
            raise ValueError(f"icmil.confidence: no default beta for {job.model!r}; set icmil.beta")
    milestones = lr_milestones(cfg)
    views = Views(teacher.encoder, cfg["crop_scale_min"], device)
    per_epoch = cfg["tiles_per_epoch"] or job.train_tiles
    steps = max(1, math.ceil(per_epoch / (world * cfg["batch_size"])))

    start, history, best = 0, [], (math.inf, -1, copy.deepcopy(student.encoder.state_dict()))
    saved = restore_state("train")
    if saved is not None:
        student.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        history, start = saved["history"], saved["epoch"] + 1
        best = (saved["best_mae"], saved["best_epoch"], saved["best_encoder"])
        log.info("%s: resumed after epoch %d", job.name, start)

    for epoch in range(start, cfg["epochs"]):
        generator = torch.Generator().manual_seed(job.seed * 1000 + rank + 7919 * epoch)
        tiles = tile_stream(job.train_shards, job.seed, epoch, cfg["shuffle_buffer"], cfg["open_shards"])
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(cfg["lr"], milestones, cfg["lr_gamma"], epoch)
        sums: dict[str, float] = {}
        started, n_tiles = time.perf_counter(), 0
        student.train()
        for batch in itertools.islice(_batches(tiles, cfg["batch_size"]), steps):
            clean, aug = views(batch, generator)
            with bf16_autocast(device):
                losses = distill_losses(
                    teacher, student, clean, aug, cfg["weight_w1"], cfg["weight_w2"], beta
                )
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            average_gradients(student)
            torch.nn.utils.clip_grad_norm_(student.head_params(), cfg["clip"])
            optimizer.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
            n_tiles += len(batch)
        seconds = time.perf_counter() - started
        mae = validation_mae(teacher, student, views, job)
        totals = gather_objects((sums, n_tiles))
        metrics: dict[str, Any] = {
            key: sum(s.get(key, 0.0) for s, _ in totals) / max(1, steps * world) for key in sums
        }
        metrics.update(
            epoch=epoch, lr=optimizer.param_groups[0]["lr"], val_mae=mae, tiles=sum(n for _, n in totals),
            epoch_s=seconds,
            tiles_per_s=sum(n for _, n in totals) / seconds if seconds > 0 else math.nan,
        )  # fmt: skip
        if mae < best[0] or not math.isfinite(mae):  # no validation tiles: the last epoch
            best = (mae, epoch, copy.deepcopy(student.encoder.state_dict()))
        history.append(metrics)
        state = None
        if rank == 0:
            log.info("%s epoch %d/%d  loss %.5f  val_mae %.5f  %.1f tiles/s", job.name, epoch + 1,
                     cfg["epochs"], metrics.get("loss", math.nan), mae, metrics["tiles_per_s"],
                     extra={"progress": True})  # fmt: skip
            state = {
                "epoch": epoch,
                "student": student.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
                "best_mae": best[0],
                "best_epoch": best[1],
                "best_encoder": best[2],
            }
        report_epoch("train", dict(metrics), state)

    if rank == 0:
        encoder = {k: v.detach().cpu() for k, v in best[2].items()}
        write_bytes_atomic(join(job.result_dir, ENCODER_FILE), _save(encoder))
        result = {"job": job.name, "best_epoch": best[1], "val_mae": best[0], "history": history}
        write_bytes_atomic(join(job.result_dir, RESULT_FILE), json.dumps(result, indent=1).encode())
