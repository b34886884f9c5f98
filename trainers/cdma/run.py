"""`slidestream train cdma`: CDMA semi-supervised segmentation on Ray Train, and the same run supervised
only (the unlabelled slides switched off) for comparison; then slide inference on the held-out slides.

Layout under `OUT/runs/<name>/`: `run.json` (the slide split and settings), `config.yaml`, `ray/<job>/`
(Ray Train storage, a checkpoint per epoch), `jobs/<job>/` (`weights.pt` = best validation Dice,
`result.json` written last), `slides/<job>/<slide_id>.{mask.png,overlay.png,geojson}` and `metrics.json`
with per-slide Dice / Jaccard / HD95 / ASD, mean ± std and the pooled Dice (the pixels of every test slide
together) for both runs side by side. Rerunning the same name resumes: finished jobs are kept, an
unfinished one continues from its last checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from slidestream.cluster.config import CDMAConfig, Config, TilingConfig, WorkerResources
from slidestream.cluster.init_weights import starting_weights
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import join, read_bytes, write_bytes_atomic
from slidestream.pipelines.annotations import Region, SlideAnnotation, find_annotation
from slidestream.pipelines.labels import LabelsError, read_labels
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.tile_store import tiles_stage
from slidestream.trainers.cdma.data import (
    TileSet,
    half_batches,
    load_tiles,
    normalise,
    split_slides,
    steps_per_epoch,
    training_batch,
)
from slidestream.trainers.cdma.infer import predict_slide, write_geojson, write_overlay
from slidestream.trainers.cdma.losses import CDMALoss
from slidestream.trainers.cdma.seg_metrics import segmentation_metrics
from slidestream.trainers.data import TrainDataError
from slidestream.trainers.dist import average_gradients, gather_objects, rank_and_world
from slidestream.trainers.fit import fit_once, write_or_check_plan
from slidestream.trainers.methods import TrainRequest
from slidestream.trainers.metrics import summarise
from slidestream.trainers.models.mtnet import EncoderBN, MTNet, build_mtnet, encoder_batchnorm
from slidestream.trainers.session import (
    bf16_autocast,
    load_weights,
    report_epoch,
    restore_state,
    train_device,
)

__all__ = [
    "CDMAJob",
    "encoder_bn",
    "encoder_weights",
    "format_cdma_table",
    "make_optimizer",
    "run_cdma",
    "slide_sites",
    "train_cdma",
]

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
WEIGHTS_FILE = "weights.pt"
_LR_SCALE = {"pretrained_weight": 1.0, "pretrained_bias": 2.0, "new_weight": 10.0, "new_bias": 20.0}
_RESOURCE_KEYS = (*WorkerResources.model_fields, "infer_batch")  # may change when a run resumes
_METRICS = ("dice", "jaccard", "hd95", "asd")


@dataclass
class CDMAJob:
    """One training (plain data: it travels to the Ray Train workers)."""

    name: str  # "cdma" or "supervised"
    semi_supervised: bool
    out: str
    tiling: dict[str, Any]
    cdma: dict[str, Any]
    labelled: list[str]
    unlabelled: list[str]
    val: list[str]
    result_dir: str
    reporter: str = "train"  # "tune": a sweep trial running the loop itself

    def to_config(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(model: MTNet, cfg: CDMAConfig) -> torch.optim.SGD:
    """SGD (Nesterov) with the four learning-rate groups; each group remembers its scale."""
    groups = [
        {"params": params, "lr": cfg.lr * _LR_SCALE[name], "scale": _LR_SCALE[name], "name": name}
        for name, params in model.parameter_groups().items()
        if params
    ]
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, cfg: CDMAConfig, epoch: int) -> float:
    """The step schedule: base lr × 0.1 per milestone reached; returns the base lr of the epoch."""
    base = cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)
    for group in optimizer.param_groups:
        group["lr"] = base * group["scale"]
    return base


_WEIGHTS_NEEDED = {
    "official": "a local torchvision/timm ResNet-50 ImageNet weights file, e.g. resnet50-0676ba61.pth",
    "light": "a local torchvision/timm ResNet-18 ImageNet weights file, e.g. resnet18-f37072fd.pth",
}


def encoder_weights(cfg: CDMAConfig) -> Path | None:
    """The encoder's ImageNet weights file; None only for an explicit `cdma.weights: random`."""
    return starting_weights(cfg.weights, setting="cdma.weights", needs=_WEIGHTS_NEEDED[cfg.network])


def encoder_bn(cfg: CDMAConfig) -> EncoderBN:
    """The encoder's BatchNorm kind of the run: `cdma.encoder_bn`, with `auto` resolved by `cdma.weights`
    (frozen for an ImageNet file, trainable for `random`)."""
    return encoder_batchnorm(cfg.encoder_bn, pretrained=encoder_weights(cfg) is not None)


def annotations_for(cfg: CDMAConfig, slide_ids: list[str]) -> dict[str, SlideAnnotation]:
    root = _annotation_root(cfg)
    found = {
        s: find_annotation(root, s, cfg.mask_suffix, cfg.mask_downsample, cfg.classes) for s in slide_ids
    }
    if missing := [s for s, a in found.items() if a is None]:
        raise TrainDataError(f"cdma: no annotation for slide(s) {missing[:5]} under {root}")
    return found  # type: ignore[return-value]


def slide_sites(cfg: CDMAConfig) -> dict[str, str] | None:
    """slide → site from `cdma.sites` (a labels file with a `site` column), or None when not set."""
    if not cfg.sites:
        return None
    table = read_labels(cfg.sites)
    if "site" not in table.column_names:
        columns = ", ".join(table.column_names)
        raise LabelsError(f"cdma.sites: labels file {cfg.sites} has no site column (it has {columns})")
    sites = table.column("site").to_pylist()
    return {s: str(site) for s, site in zip(table.column("slide_id").to_pylist(), sites, strict=True) if site}


def _annotation_root(cfg: CDMAConfig) -> str:
    if not cfg.annotations:
        raise TrainDataError("cdma: no annotation directory; give --annotations DIR (cdma.annotations)")
    return cfg.annotations


# ------------------------------------------------------------------------------------------- the loop


@torch.no_grad()
def tile_dice(model: MTNet, tiles: TileSet, n_classes: int, batch: int, device: torch.device) -> float:
    """Decoder 1's Dice over all validation pixels jointly, mean over foreground classes (ranks share)."""
    rank, world = rank_and_world()
    model.eval()
    inter = np.zeros(n_classes)
    total = np.zeros(n_classes)
    assert tiles.masks is not None
    mine = np.arange(rank, len(tiles), world)
    for start in range(0, len(mine), batch):
        idx = mine[start : start + batch]
        with bf16_autocast(device):
            pred = model(normalise(tiles.images[idx], device)).argmax(1).cpu().numpy()
        truth = tiles.masks[idx]
        for c in range(1, n_classes):
            inter[c] += np.sum((pred == c) & (truth == c))
            total[c] += np.sum(pred == c) + np.sum(truth == c)
    parts = gather_objects((inter, total))
    inter = sum(p[0] for p in parts)
    total = sum(p[1] for p in parts)
    dice = [2 * inter[c] / total[c] if total[c] else 1.0 for c in range(1, n_classes)]
    return float(np.mean(dice))


def _state_dict_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def train_cdma(config: dict[str, Any]) -> None:
    """The Ray Train loop (every worker runs it): half-labelled batches, averaged gradients, a checkpoint
    every epoch, best-validation-Dice weights, and `result.json` written last by rank 0."""
    job = CDMAJob(**config)
    cfg = CDMAConfig(**job.cdma)
    tiling = TilingConfig(**job.tiling)
    rank, world = rank_and_world()
    device = train_device()
    n_classes = len(cfg.classes)
    annotations = annotations_for(cfg, job.labelled + job.val)
    labelled = load_tiles(job.out, tiling, job.labelled, annotations, cfg.min_tissue_frac)
    unlabelled = (
        load_tiles(job.out, tiling, job.unlabelled, None, cfg.min_tissue_frac)
        if job.semi_supervised and job.unlabelled
        else None
    )
    val = load_tiles(job.out, tiling, job.val, annotations, cfg.min_tissue_frac) if job.val else None
    torch.manual_seed(cfg.seed)
    model = build_mtnet(n_classes, cfg.network, encoder_weights(cfg), encoder_bn(cfg)).to(device)
    optimizer = make_optimizer(model, cfg)
    loss_fn = CDMALoss(
        cfg.kd_weight, cfg.entropy_weight, cfg.unsup_start_epoch, cfg.temperature, job.semi_supervised
    )
    start, history, best, best_state = 0, [], -math.inf, None
    saved = restore_state(job.reporter)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start, history, best = int(saved["epoch"]) + 1, list(saved["history"]), float(saved["best"])
        best_state = saved["best_model"]
    half = cfg.batch_size // 2
    n_unl = len(unlabelled) if unlabelled is not None else 0
    steps = steps_per_epoch(len(labelled), half, world, cfg.steps_per_epoch)  # the same for both runs
    for epoch in range(start, cfg.epochs):
        lr = set_learning_rate(optimizer, cfg, epoch)
        started = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * world + rank)
        sums: dict[str, float] = {}
        batches = half_batches(len(labelled), n_unl, half, steps, cfg.seed, epoch, rank, world)
        # Before the unsupervised terms count, unlabelled tiles reach the loss only through BatchNorm
        # batch statistics; in a network without them, forwarding those tiles would change nothing.
        forwarded = unlabelled if loss_fn.uses_unlabelled(epoch) or model.mixes_images() else None
        for lab_idx, unl_idx in batches:
            x, y = training_batch(
                labelled, forwarded, lab_idx, unl_idx, gen, cfg.noise_std, cfg.noise_p, device
            )
            with bf16_autocast(device):
                logits = model(x)
            loss, parts = loss_fn([z.float() for z in logits], y, len(lab_idx), epoch)
            optimizer.zero_grad(set_to_none=False)
            loss.backward()
            average_gradients(model)
            optimizer.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value / steps
        seconds = time.perf_counter() - started  # training steps only (validation excluded)
        val_dice = tile_dice(model, val, n_classes, cfg.infer_batch, device) if val is not None else math.nan
        if val is None or val_dice > best:
            best, best_state = (val_dice if val is not None else best), _state_dict_copy(model)
        metrics = {
            "epoch": epoch,
            "lr": lr,
            "epoch_s": seconds,
            "val_dice": val_dice,
            **{f"loss_{k}": v for k, v in sums.items()},
        }
        history.append(metrics)
        state = None
        if rank == 0:
            losses = "  ".join(f"{k} {v:.4g}" for k, v in sums.items())
            log.info("%s epoch %d/%d  val_dice %.4f  %s  %.1f s", job.name, epoch + 1, cfg.epochs, val_dice,
                     losses, seconds, extra={"progress": True})  # fmt: skip
            state = {
                "model": _state_dict_copy(model),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
                "best": best,
                "best_model": best_state,
            }
        report_epoch(job.reporter, metrics, state)
    if rank == 0:
        buffer = io.BytesIO()
        torch.save(best_state if best_state is not None else _state_dict_copy(model), buffer)
        write_bytes_atomic(join(job.result_dir, WEIGHTS_FILE), buffer.getvalue())
        result = {
            "history": history,
            "best_val_dice": best,
            "tiles": {"labelled": len(labelled), "unlabelled": n_unl},
            "steps_per_epoch": steps,
        }
        write_bytes_atomic(join(job.result_dir, RESULT_FILE), json.dumps(result, indent=1).encode())


# ----------------------------------------------------------------------------------------- the run


class CDMARun:
    """One named CDMA run under an output root (split, training jobs, inference, metrics)."""

    def __init__(self, name: str, out: str, config: Config) -> None:
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise TrainDataError(f"--name must be a plain name (no slashes), got {name!r}")
        self.name, self.out, self.config = name, out, config
        self.cfg = config.cdma
        encoder_weights(self.cfg)  # refuse an implied random init before any work
        self.run_dir = join(out, "runs", name)
        stage = tiles_stage(config.tiling)
        self.entries = {e.slide_id: e for e in Ledger(out).entries(stage) if e.status == "ok"}
        if not self.entries:
            raise TrainDataError(f"no committed tiles under {join(out, stage)}; run slidestream ingest first")
        root = _annotation_root(self.cfg)
        found = {
            s: find_annotation(root, s, self.cfg.mask_suffix, self.cfg.mask_downsample, self.cfg.classes)
            for s in sorted(self.entries)
        }
        self.annotations = {s: a for s, a in found.items() if a is not None}
        if not self.annotations:
            raise TrainDataError(
                f"cdma: none of the {len(found)} ingested slides has an annotation in {root}"
            )
        foreground = {s: a.has_foreground() for s, a in self.annotations.items()}
        unannotated = sorted(set(self.entries) - set(self.annotations))
        self.split = split_slides(
            foreground, unannotated, self.cfg.labelled_frac, self.cfg.test_frac, self.cfg.val_slides,
            self.cfg.split_seed, self.cfg.labelled_slides, slide_sites(self.cfg),
        )  # fmt: skip

    def plan(self) -> dict[str, Any]:
        cdma = {k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in _RESOURCE_KEYS}
        return {"kind": "cdma", "tiling": self.config.tiling.model_dump(mode="json"), "cdma": cdma,
                "split": self.split.to_dict()}  # fmt: skip

    def jobs(self) -> list[CDMAJob]:
        kinds = [("cdma", True)] + ([("supervised", False)] if self.cfg.supervised_baseline else [])
        return [
            CDMAJob(
                name=name,
                semi_supervised=semi,
                out=self.out,
                tiling=self.config.tiling.model_dump(mode="json"),
                cdma=self.cfg.model_dump(mode="json"),
                labelled=self.split.labelled,
                unlabelled=self.split.unlabelled if semi else [],
                val=self.split.val,
                result_dir=join(self.run_dir, "jobs", name),
            )
            for name, semi in kinds
        ]

    def execute(self) -> dict[str, Any]:
        ensure_ray(self.config.ray)
        write_or_check_plan(self.run_dir, self.name, self.plan(), self.config)
        jobs = self.jobs()
        for job in jobs:
            result_uri = join(job.result_dir, RESULT_FILE)
            fit_once(train_cdma, job.to_config(), job.name, self.cfg, join(self.run_dir, "ray"), result_uri)
        metrics: dict[str, Any] = {
            "kind": "cdma", "classes": self.cfg.classes, "network": self.cfg.network,
            "split": self.split.to_dict(), "runs": {},
        }  # fmt: skip
        for job in jobs:
            metrics["runs"][job.name] = self.evaluate(job)
        write_bytes_atomic(join(self.run_dir, "metrics.json"), json.dumps(metrics, indent=1).encode())
        return metrics

    def evaluate(self, job: CDMAJob) -> dict[str, Any]:
        """Slide inference on the test slides with the job's best weights: outputs and metrics per slide."""
        model = build_mtnet(len(self.cfg.classes), self.cfg.network, encoder_bn=encoder_bn(self.cfg))
        model.load_state_dict(load_weights(join(job.result_dir, WEIGHTS_FILE)))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        result = json.loads(read_bytes(join(job.result_dir, RESULT_FILE)))
        done = [self._slide(model, job, slide_id, device) for slide_id in self.split.test]
        rows = [row for row, _ in done]
        numeric = [{k: v for k, v in r.items() if k not in ("slide_id", "windows")} for r in rows]
        mean, std = summarise(numeric)
        counts = np.sum([c for _, c in done], axis=0)  # (classes - 1, 2): intersection, |pred| + |truth|
        pooled = {
            f"dice_{self.cfg.classes[c]}": float(2 * inter / total) if total else 1.0
            for c, (inter, total) in enumerate(counts, start=1)
        }
        return {"slides": rows, "mean": mean, "std": std, "pooled": pooled,
                "best_val_dice": result["best_val_dice"], "history": result["history"]}  # fmt: skip

    def _slide(
        self, model: MTNet, job: CDMAJob, slide_id: str, device: torch.device
    ) -> tuple[dict[str, Any], np.ndarray]:
        """The slide's outputs and metrics row, and per foreground class its pixel counts for the pooled
        Dice (intersection, predicted + true)."""
        ds = self.cfg.mask_downsample
        uri = self.entries[slide_id].uri
        pred = predict_slide(
            model, uri, self.config.tiling, self.config.tissue, ds, self.cfg.infer_overlap,
            self.cfg.infer_batch, device,
        )  # fmt: skip
        truth = self.annotations[slide_id].region(Region(0, 0, pred.mask.shape[1], pred.mask.shape[0], ds))
        base = join(self.run_dir, "slides", job.name, slide_id)
        buffer = io.BytesIO()
        Image.fromarray(pred.mask).save(buffer, format="PNG")
        write_bytes_atomic(f"{base}.mask.png", buffer.getvalue())
        write_overlay(uri, pred.mask, ds, f"{base}.overlay.png")
        write_geojson(pred.mask, ds, self.cfg.classes, f"{base}.geojson")
        row: dict[str, Any] = {"slide_id": slide_id, "windows": pred.windows}
        per_class = [
            segmentation_metrics(pred.mask == c, truth == c, ds * pred.slide_mpp)
            for c in range(1, len(self.cfg.classes))
        ]
        for c, values in enumerate(per_class, start=1):
            row.update({f"{k}_{self.cfg.classes[c]}": v for k, v in values.items()})
        for key in _METRICS:
            finite = [v[key] for v in per_class if math.isfinite(v[key])]
            row[key] = float(np.mean(finite)) if finite else math.nan
        counts = np.array(
            [
                [np.sum((pred.mask == c) & (truth == c)), np.sum(pred.mask == c) + np.sum(truth == c)]
                for c in range(1, len(self.cfg.classes))
            ],
            dtype=np.float64,
        )
        return row, counts


def format_cdma_table(metrics: dict[str, Any]) -> str:
    """CDMA and supervised-only side by side: mean ± std of each metric over the test slides."""
    lines = [f"{'run':<12} " + " ".join(f"{k:>16}" for k in _METRICS)]
    for name, run in metrics["runs"].items():
        cells = " ".join(
            f"{run['mean'].get(k, math.nan):>8.3f}±{run['std'].get(k, math.nan):<7.3f}" for k in _METRICS
        )
        lines.append(f"{name:<12} {cells}")
    return "\n".join(lines)


def run_cdma(request: TrainRequest, config: Config) -> dict[str, Any]:
    """`slidestream train cdma` (the method table's entry): the metrics that `format_cdma_table` prints."""
    print(f"train cdma: {config.cdma.network} MTNet on {request.out} → {request.run_dir}")
    return CDMARun(request.name, request.out, config).execute()
