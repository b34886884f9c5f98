"""One fold's training on every Ray Train worker: baseline MIL or MHIM-MIL, epoch selection, checkpoints.

The driver (`trainers/mil/runner.py`) describes a fold as a `FoldJob`; `train_fold` runs it. Every rank keeps
identical model weights (same initial seed, averaged gradients), takes the same number of steps per epoch
and evaluates its share of the validation / test bags, which are then gathered. Rank 0 writes the
checkpoint every epoch and, at the end, the fold's result files; `result.json` is written last, so its
presence means the fold is complete.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from slidestream.cluster.storage import join, write_bytes_atomic
from slidestream.pipelines.features import FeatureBags
from slidestream.trainers.data import BagCache
from slidestream.trainers.dist import average_gradients, gather_objects, rank_and_world, shard_with_padding
from slidestream.trainers.metrics import choose_threshold, classification_metrics
from slidestream.trainers.mil.mhim import consistency_loss, cosine_value, ema_update, mask_instances
from slidestream.trainers.models import build_model
from slidestream.trainers.models.base import MILModel
from slidestream.trainers.session import (
    RESULT_FILE,
    WEIGHTS_FILE,
    bf16_autocast,
    checkpoint_bytes,
    load_weights,
    report_epoch,
    restore_state,
    train_device,
)

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"


@dataclass
class FoldJob:
    """Everything a worker needs to train one fold (plain data: it travels to the workers)."""

    name: str  # unique within the run, e.g. "mhim-s0-f2"
    kind: str  # "mil" (baseline) or "mhim"
    seed: int
    fold: int
    train_ids: list[str]
    val_ids: list[str]
    test_ids: list[str]
    targets: dict[str, int]
    classes: list[str]
    features: str
    dim: int
    result_dir: str
    train: dict[str, Any]  # TrainConfig as a dict
    mhim: dict[str, Any] | None = None  # resolved MHIM parameters (kind == "mhim")
    teacher_weights: str | None = None  # weights file of the baseline that initialises the teacher
    depends_on: list[str] = field(default_factory=list)  # jobs whose results must exist first
    reporter: str = "train"  # "train": inside a TorchTrainer; "tune": a sweep trial running the loop itself

    def to_config(self) -> dict[str, Any]:
        return asdict(self)


def model_from_job(job: FoldJob) -> MILModel:
    cfg = job.train
    return build_model(cfg["model"], job.dim, len(job.classes), **cfg["model_options"])


class EarlyStopping:
    """Tracks the best validation value (lower loss or higher AUC) and when to stop. Epochs before
    `min_epochs` are never stopped at and, unless `keep_early` (the official MHIM-MIL rule), never kept:
    on the few validation bags of a small cohort an early, under-trained epoch often scores best by chance."""

    def __init__(self, monitor: str, patience: int, min_epochs: int, keep_early: bool = False) -> None:
        self.monitor = monitor
        self.patience = patience
        self.min_epochs = min_epochs
        self.keep_from = 0 if keep_early else min_epochs
        self.best = math.inf
        self.best_epoch = -1
        self.bad_epochs = 0

    def _score(self, metrics: dict[str, float]) -> float:
        value = metrics[self.monitor]
        if not math.isfinite(value):
            return math.inf
        return value if self.monitor == "val_loss" else -value

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record an epoch; True when it is the best so far (and may be kept)."""
        if epoch + 1 < self.keep_from:
            return False
        score = self._score(metrics)
        if score < self.best:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    def should_stop(self, epoch: int) -> bool:
        return epoch + 1 >= self.min_epochs and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, float]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.bad_epochs = int(state["bad_epochs"])


class LastEpoch:
    """Fixed-epoch selection: every epoch runs and the last one is kept (the papers' protocol), so the few
    validation bags of a small cohort cannot pick an early, under-trained epoch."""

    def __init__(self) -> None:
        self.best_epoch = -1

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        self.best_epoch = epoch
        return True

    def should_stop(self, epoch: int) -> bool:
        return False

    def state_dict(self) -> dict[str, float]:
        return {"best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best_epoch = int(state["best_epoch"])


def epoch_selector(cfg: dict[str, Any]) -> EarlyStopping | LastEpoch:
    """How the fold's kept epoch is chosen (`train.selection`)."""
    if cfg["selection"] == "fixed_epochs":
        return LastEpoch()
    min_epochs = min(cfg["min_epochs"], cfg["epochs"])
    return EarlyStopping(cfg["monitor"], cfg["patience"], min_epochs, cfg["keep_early_epochs"])


class MHIMStep:
    """The MHIM-MIL training step: EMA teacher on the full bag (train mode, no gradient), hard-instance
    masking from its scores, student on the kept instances, CE + α·consistency, then EMA after the update."""

    def __init__(
        self, student: MILModel, params: dict[str, Any], teacher_state: dict | None, total_steps: int
    ):
        self.p = params
        self.total_steps = max(1, total_steps)
        self.teacher = copy.deepcopy(student)
        if teacher_state is not None:
            self.teacher.load_state_dict(teacher_state)
            first = student.embed[0]  # the student takes only the instance-embedding Linear
            first.load_state_dict(self.teacher.embed[0].state_dict())
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.teacher.train()  # dropout on, as in the official code
        ratios = (params["mask_ratio"], params["mask_ratio_l"], params["mask_ratio_h"])
        # With no masking and no consistency term the teacher's output is unused: skip it, so the run
        # is exactly the baseline (the teacher's dropout would otherwise consume random numbers).
        self.needs_teacher = any(r > 0 for r in ratios) or params["alpha"] > 0

    def high_ratio(self, step: int) -> float:
        h = self.p["mask_ratio_h"]
        return cosine_value(step, self.total_steps, h, 0.0) if self.p["mask_ratio_h_decay"] else h

    def momentum(self, step: int) -> float:
        m = self.p["momentum"]
        return cosine_value(step, self.total_steps, m, 1.0) if self.p["momentum_cosine"] else m

    def loss(self, student: MILModel, x: torch.Tensor, y: torch.Tensor, step: int, gen: torch.Generator):
        if not self.needs_teacher:
            return student.loss(student(x), y)
        with torch.no_grad():
            t_out = self.teacher(x)
        kept = mask_instances(
            t_out["scores"],
            mask_ratio=self.p["mask_ratio"],
            mask_ratio_l=self.p["mask_ratio_l"],
            mask_ratio_h=self.high_ratio(step),
            mask_ratio_hr=self.p["mask_ratio_hr"],
            generator=gen,
        )
        s_out = student(x[kept.to(x.device)])
        loss = student.loss(s_out, y)
        if self.p["alpha"] > 0:
            tau_s, tau_t = self.p["tau_s"], self.p["tau_t"]
            con = consistency_loss(s_out["bag_feature"], t_out["bag_feature"], tau_s, tau_t)
            loss = loss + self.p["alpha"] * con
        return loss

    def after_step(self, student: nn.Module, step: int) -> None:
        if self.needs_teacher:
            ema_update(self.teacher, student, self.momentum(step))


def feature_statistics(ids: list[str], cache: BagCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and ONE scale (the root mean variance over dimensions) over every instance of the
    given (training) bags. A single scale fixes the features' magnitude without amplifying near-constant
    dimensions (per-dimension z-scores blow float16 noise up into features the model memorises)."""
    total = squares = None
    count = 0
    for slide_id in ids:
        x = cache.get(slide_id).features.double()
        total = x.sum(0) if total is None else total + x.sum(0)
        squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
        count += x.shape[0]
    assert total is not None and squares is not None
    mean = total / count
    var = (squares / count - mean * mean).clamp_min(0.0)
    scale = var.mean().sqrt()
    return mean.float(), torch.full_like(mean, float(scale)).float()


@torch.no_grad()
def evaluate(
    model: MILModel, ids: list[str], job: FoldJob, cache: BagCache, device: torch.device
) -> tuple[list[str], np.ndarray, float]:
    """Probabilities (in `ids` order) and mean loss over `ids`, each rank doing its share."""
    rank, world = rank_and_world()
    model.eval()
    mine = []
    for slide_id in ids[rank::world]:
        x = cache.features(slide_id, device)
        y = torch.tensor([job.targets[slide_id]], device=device)
        with bf16_autocast(device):
            out = model(x)
            loss = model.loss(out, y)
        probs = model.probabilities(out).float().cpu().numpy()[0]
        mine.append((slide_id, probs, float(loss)))
    rows = {sid: (p, bag_loss) for part in gather_objects(mine) for sid, p, bag_loss in part}
    probs = np.stack([rows[s][0] for s in ids])
    return ids, probs, float(np.mean([rows[s][1] for s in ids]))


def _val_metrics(job: FoldJob, probs: np.ndarray, loss: float) -> dict[str, float]:
    y = [job.targets[s] for s in job.val_ids]
    return {"val_loss": loss, "val_auc": classification_metrics(y, probs, job.classes)["auc"]}


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """`train.lr_schedule`, stepped once per epoch: cosine annealing to 0 over `epochs`, or constant."""
    if schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


def train_fold(config: dict[str, Any]) -> None:
    """The Ray Train loop for one fold (every worker runs it)."""
    job = FoldJob(**config)
    cfg = job.train
    rank, world = rank_and_world()
    device = train_device()
    torch.manual_seed(job.seed)  # identical initial weights on every rank
    model = model_from_job(job).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = lr_scheduler(optimizer, cfg["lr_schedule"], cfg["epochs"])
    stopper = epoch_selector(cfg)
    cache = BagCache(FeatureBags(job.features), cfg["cache_mb"])
    if cfg["standardize"]:
        model.embed.set_statistics(*feature_statistics(job.train_ids, cache))
    steps_per_epoch = len(shard_with_padding(job.train_ids, job.seed, 0, rank, world))
    mhim = None
    if job.kind == "mhim":
        assert job.mhim is not None
        teacher = load_weights(job.teacher_weights) if job.teacher_weights else None
        mhim = MHIMStep(model, job.mhim, teacher, cfg["epochs"] * steps_per_epoch)
        mhim.teacher.to(device)

    start, history, best_state = 0, [], copy.deepcopy(model.state_dict())
    saved = restore_state(job.reporter)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        stopper.load_state_dict(saved["stopper"])
        best_state, history, start = saved["best_model"], saved["history"], saved["epoch"] + 1
        if mhim is not None:
            mhim.teacher.load_state_dict(saved["teacher"])
        log.info("%s: resumed after epoch %d", job.name, saved["epoch"] + 1)

    gen = torch.Generator().manual_seed(job.seed * 1000 + rank)
    order_gen = torch.Generator()
    torch.manual_seed(job.seed * 1000 + rank + 1)
    stopped = start > 0 and stopper.should_stop(start - 1)
    for epoch in range(start, cfg["epochs"]):
        if stopped:
            break
        gen.manual_seed(job.seed * 1000 + rank + 7919 * epoch)  # a resumed epoch draws the same masks
        order_gen.manual_seed(job.seed * 1000 + rank + 7919 * epoch + 2)  # its own stream: masks unchanged
        torch.manual_seed(job.seed * 1000 + rank + 7919 * epoch + 1)
        started = time.perf_counter()
        model.train()
        losses = []
        for i, slide_id in enumerate(shard_with_padding(job.train_ids, job.seed, epoch, rank, world)):
            step = epoch * steps_per_epoch + i
            x = cache.features(slide_id, device)
            if cfg["shuffle_instances"]:
                x = x[torch.randperm(x.shape[0], generator=order_gen).to(device)]
            y = torch.tensor([job.targets[slide_id]], device=device)
            with bf16_autocast(device):
                loss = mhim.loss(model, x, y, step, gen) if mhim else model.loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model)
            if cfg.get("grad_clip") is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            if mhim:
                mhim.after_step(model, step)
            losses.append(float(loss.detach()))
        scheduler.step()
        _, val_probs, val_loss = evaluate(model, job.val_ids, job, cache, device)
        metrics = _val_metrics(job, val_probs, val_loss)
        metrics["train_loss"] = float(np.mean([x for part in gather_objects(losses) for x in part]))
        metrics["epoch"] = epoch
        metrics["epoch_s"] = time.perf_counter() - started  # training and validation, not checkpointing
        if stopper.update(epoch, metrics):
            best_state = copy.deepcopy(model.state_dict())
        history.append(metrics)
        stopped = stopper.should_stop(epoch)
        state = None
        if rank == 0:
            log.info(
                "%s epoch %d/%d  train_loss %.4f  val_loss %.4f  val_auc %.4f",
                job.name,
                epoch + 1,
                cfg["epochs"],
                metrics["train_loss"],
                val_loss,
                metrics["val_auc"],
                extra={"progress": True},
            )
            state = {
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "stopper": stopper.state_dict(),
                "best_model": best_state,
                "history": history,
                "teacher": mhim.teacher.state_dict() if mhim else None,
            }
        report_epoch(job.reporter, dict(metrics), state)

    model.load_state_dict(best_state)
    _finish(job, model, cache, device, history, stopper.best_epoch)


def _finish(
    job: FoldJob, model: MILModel, cache: BagCache, device: torch.device, history: list, best_epoch: int
) -> None:
    """Evaluate the best model on validation (threshold) and test; rank 0 writes the fold's result."""
    rank, _ = rank_and_world()
    _, val_probs, _ = evaluate(model, job.val_ids, job, cache, device)
    test_ids, test_probs, test_loss = evaluate(model, job.test_ids, job, cache, device)
    if rank != 0:
        return
    threshold = None
    if len(job.classes) == 2:
        threshold = choose_threshold([job.targets[s] for s in job.val_ids], val_probs[:, 1])
    y_test = [job.targets[s] for s in test_ids]
    metrics = classification_metrics(y_test, test_probs, job.classes, threshold)
    metrics.update({"loss": test_loss, "best_epoch": best_epoch, "epochs_run": len(history)})
    cpu_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_bytes_atomic(join(job.result_dir, WEIGHTS_FILE), checkpoint_bytes(cpu_state))
    predictions = _predictions(job, test_ids, test_probs, threshold)
    write_bytes_atomic(join(job.result_dir, PREDICTIONS_FILE), predictions)
    result = {
        "job": job.name,
        "kind": job.kind,
        "seed": job.seed,
        "fold": job.fold,
        "metrics": metrics,
        "history": history,
        "classes": job.classes,
        "model": job.train["model"],
        "model_options": job.train["model_options"],
        "dim": job.dim,
    }
    write_bytes_atomic(join(job.result_dir, RESULT_FILE), json.dumps(result, indent=1).encode())


def _predictions(job: FoldJob, ids: list[str], probs: np.ndarray, threshold: float | None) -> bytes:
    pred = probs.argmax(axis=1) if threshold is None else (probs[:, 1] >= threshold).astype(np.int64)
    columns: dict[str, Any] = {
        "slide_id": ids,
        "seed": [job.seed] * len(ids),
        "fold": [job.fold] * len(ids),
        "label": [job.classes[job.targets[s]] for s in ids],
        "prediction": [job.classes[int(p)] for p in pred],
    }
    for c, name in enumerate(job.classes):
        columns[f"prob_{name}"] = probs[:, c].astype(np.float64)
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()
