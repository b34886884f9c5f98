"""Giga-SSL training on Ray Train and the export of per-slide embeddings (the official Giga-SSL recipe).

A step takes the GLOBAL batch of `gigassl.batch_size` slides, split evenly across the workers; every
worker draws two views of each of its slides (T tiles of one stored augmentation, augmented
coordinates), encodes each view set in its own forward pass of the sparse ResNet layer4 + projector (its
own BatchNorm batch, as the official loop), and the NT-Xent over all 2B views is computed with the
projections gathered across workers with autograd (`trainers/gigassl/ntxent.py`). Layer4 starts from a
local ImageNet ResNet-18 file (`gigassl.init_weights`) or, asked for by name, from random weights.

`gigassl.epochs=0` trains nothing: the run exports the network at its initialisation (the same seed gives
the same starting weights as a trained run's, BatchNorm at its initial statistics), the untrained baseline
that a probe of a trained run is compared with.

Run layout `OUT/runs/<name>/`: `run.json` (the plan: a rerun with other settings is refused, the same
settings resume from the last epoch checkpoint), `config.yaml`, `ray/` (Ray Train checkpoints),
`weights.pt` + `result.json` (written last: the run is complete), `curves.png`, `embeddings.parquet`.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from slidestream.cluster.config import Config, GigaSSLConfig, WorkerResources
from slidestream.cluster.init_weights import starting_weights
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import exists, join, read_bytes, write_bytes_atomic
from slidestream.pipelines.features import Bag, FeatureBags
from slidestream.trainers import session
from slidestream.trainers.data import BagCache, TrainDataError
from slidestream.trainers.dist import rank_and_world, shard_with_padding, sum_over_ranks
from slidestream.trainers.fit import fit_once, worker_count, write_or_check_plan
from slidestream.trainers.gigassl.ntxent import backward_global, global_ntxent
from slidestream.trainers.gigassl.sparse_maps import (
    augment_coords,
    build_batch,
    draw_view,
    grid_step,
    to_cells,
)
from slidestream.trainers.methods import TrainRequest
from slidestream.trainers.models.sparse_pool import GigaSSLNet, load_resnet18_layer4
from slidestream.trainers.optim import build_optimizer, warmup_cosine

__all__ = [
    "GigaSSLJob",
    "GigaSSLRun",
    "export_embeddings",
    "export_run",
    "format_gigassl",
    "run_gigassl",
    "tile_features_for",
    "train_gigassl",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
RESULT_FILE = "result.json"
EMBEDDINGS_FILE = "embeddings.parquet"
# Settings that may change between a run and its resumption (resources and export, not training).
_FREE_KEYS = (*WorkerResources.model_fields, "cache_mb", "export_chunks", "export_bn")


@dataclass
class GigaSSLJob:
    """What every worker needs (plain data: it travels to the workers)."""

    name: str
    views: str  # directory of Giga-SSL view bags (or plain feature bags: one augmentation each)
    slide_ids: list[str]
    in_dim: int
    run_dir: str
    cfg: dict[str, Any]  # GigaSSLConfig as a dict
    reporter: str = "train"
    # a sweep trial's fold split for a linear probe after every epoch: features (un-augmented tile bags),
    # classes, targets {slide_id: class index}, train / val / test slide ids
    probe: dict[str, Any] | None = None


def learning_rate(cfg: dict[str, Any]) -> float:
    """The configured lr, or the paper's 0.03 × batch / 256."""
    return cfg["lr"] if cfg["lr"] is not None else 0.03 * cfg["batch_size"] / 256


def schedule_epochs(cfg: dict[str, Any]) -> int:
    """Epochs of the warm-up + cosine schedule: `schedule_epochs`, or `epochs` when unset. Training may
    stop before the schedule ends (the paper's model is epoch 1000 of a 3000-epoch schedule)."""
    length = cfg["schedule_epochs"] or cfg["epochs"]
    if length < cfg["epochs"]:
        raise TrainDataError(f"gigassl.schedule_epochs ({length}) must be at least gigassl.epochs "
                             f"({cfg['epochs']}): the learning rate is 0 after the schedule")  # fmt: skip
    return length


def lr_factor(cfg: dict[str, Any], steps_per_epoch: int) -> Callable[[int], float]:
    """The learning-rate factor per step: linear warm-up over `warmup_epochs`, then cosine to 0 at the
    end of the schedule (`schedule_epochs`), wherever training stops."""
    total, warmup = schedule_epochs(cfg) * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch
    return lambda step: warmup_cosine(step, warmup, total)


def layer4_weights(value: str | None) -> Path | None:
    """The ImageNet ResNet-18 file layer4 starts from (as in the paper), or None for `random`."""
    return starting_weights(
        value, setting="gigassl.init_weights",
        needs="a local torchvision ResNet-18 ImageNet weights file, e.g. resnet18-f37072fd.pth; "
              "the tile features must be 256-d, as ResNet-18 layer3's",
    )  # fmt: skip


def global_batch(n_slides: int, batch_size: int, world: int) -> int:
    """Slides per step: the configured batch, at most the number of slides, a multiple of the workers."""
    size = min(batch_size, n_slides) // world * world
    if size < max(2, world):
        raise TrainDataError(
            f"gigassl: {n_slides} slides cannot fill a batch of at least 2 slides over {world} worker(s)"
        )
    return size


class ViewMaker:
    """Views of slides as sparse-map inputs: bags from a cache, the cell size per slide."""

    def __init__(self, cache: BagCache, cfg: dict[str, Any]) -> None:
        self.cache, self.cfg = cache, cfg
        self._cells: dict[str, float] = {}

    def cell(self, bag: Bag) -> float:
        if self.cfg["cell_px"]:
            return float(self.cfg["cell_px"])
        if bag.slide_id not in self._cells:
            self._cells[bag.slide_id] = grid_step(bag.coords.numpy(), bag.slide_id)
        return self._cells[bag.slide_id]

    def view(self, slide_id: str, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
        """One augmented view: map cells and features of T tiles of one stored augmentation."""
        bag = self.cache.get(slide_id)
        cell = self.cell(bag)
        xy, feats = draw_view(bag, self.cfg["n_tiles"], rng)
        return to_cells(augment_coords(xy, rng, cell), cell), feats


def build_net(cfg: dict[str, Any], in_dim: int) -> GigaSSLNet:
    net = GigaSSLNet(in_dim, cfg["dim"], cfg["proj_dim"])
    weights = layer4_weights(cfg["init_weights"])
    if weights is not None:
        load_resnet18_layer4(net.pool, str(weights))
    return net


def step_loss(net: GigaSSLNet, views: ViewMaker, ids: list[str], rng: np.random.Generator, tau: float,
              device: torch.device) -> torch.Tensor:  # fmt: skip
    """The NT-Xent of a step over two views of each slide in `ids` (and the other workers' projections).
    The first views and the second views each go through their own forward pass, so BatchNorm normalises
    each view set over its own sites and slides, as the official loop does (one stacked pass would put
    both views in one BatchNorm batch)."""
    first, second = (build_batch([views.view(s, rng) for s in ids]).tensor(device) for _ in range(2))
    z1, z2 = net(first)[1], net(second)[1]
    with session.bf16_autocast(device):
        return global_ntxent(z1.float(), z2.float(), tau)


def train_gigassl(config: dict[str, Any]) -> None:
    """The Ray Train loop (every worker runs it)."""
    job = GigaSSLJob(**config)
    cfg = job.cfg
    rank, world = rank_and_world()
    device = session.train_device()
    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank
    net = build_net(cfg, job.in_dim).to(device)
    lr = learning_rate(cfg)
    optimizer = build_optimizer(cfg["optimizer"], net, lr, cfg["weight_decay"], cfg["momentum"])
    batch = global_batch(len(job.slide_ids), cfg["batch_size"], world)
    local = batch // world
    steps = len(job.slide_ids) // batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps))
    views = ViewMaker(BagCache(FeatureBags(job.views, require_labels=False), cfg["cache_mb"]), cfg)
    probe_bags = (
        ViewMaker(BagCache(FeatureBags(job.probe["features"], require_labels=False), cfg["cache_mb"]), cfg)
        if job.probe is not None and rank == 0
        else None
    )

    start, history = 0, []
    saved = session.restore_state(job.reporter)
    if saved is not None:
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        history, start = saved["history"], saved["epoch"] + 1
        log.info("%s: resumed after epoch %d", job.name, start)

    for epoch in range(start, cfg["epochs"]):
        started = time.perf_counter()
        net.train()
        mine = shard_with_padding(job.slide_ids, cfg["seed"], epoch, rank, world)
        losses = []
        for step in range(steps):
            rng = np.random.default_rng([cfg["seed"], epoch, step, rank])
            ids = mine[step * local : (step + 1) * local]
            loss = step_loss(net, views, ids, rng, cfg["tau"], device)
            optimizer.zero_grad(set_to_none=True)
            backward_global(loss, net)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        elapsed = float(sum_over_ranks(torch.tensor(time.perf_counter() - started)) / world)
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "lr": scheduler.get_last_lr()[0],
            "epoch_s": elapsed,
            "slides_per_s": steps * batch / elapsed,
        }
        if probe_bags is not None and job.probe is not None:
            metrics.update(split_probe(net, probe_bags, job.probe, cfg, device))
        history.append(metrics)
        state = None
        if rank == 0:
            log.info("%s epoch %d/%d  loss %.4f  lr %.2e  %.1f slides/s", job.name, epoch + 1, cfg["epochs"],
                     metrics["train_loss"], metrics["lr"], metrics["slides_per_s"],
                     extra={"progress": True})  # fmt: skip
            state = {"epoch": epoch, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "history": history}  # fmt: skip
        session.report_epoch(job.reporter, dict(metrics), state)

    if rank == 0:
        cpu_state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        write_bytes_atomic(join(job.run_dir, WEIGHTS_FILE), session.checkpoint_bytes(cpu_state))
        result = {"name": job.name, "in_dim": job.in_dim, "gigassl": cfg, "history": history,
                  "batch": batch, "workers": world}  # fmt: skip
        write_bytes_atomic(join(job.run_dir, RESULT_FILE), json.dumps(result, indent=1).encode())


# -- export -------------------------------------------------------------------------------------------------


def _chunks(bag: Bag, n_tiles: int, limit: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of up to `limit` chunks of T tiles, each from one augmentation (all rows used once
    when they fit), taken from the augmentations in turn."""
    augs = np.zeros(len(bag.features), dtype=np.int64) if bag.aug is None else bag.aug.numpy()
    per_aug = []
    for a in np.unique(augs):
        rows = rng.permutation(np.flatnonzero(augs == a))
        per_aug.append([rows[i : i + n_tiles] for i in range(0, len(rows), n_tiles)])
    longest = max(len(group) for group in per_aug)
    chunks = [group[i] for i in range(longest) for group in per_aug if i < len(group)]
    return chunks[:limit]


def _export_maps(bag: Bag, cfg: dict[str, Any], cell: float) -> list[tuple[Any, torch.Tensor]]:
    """A slide's export chunks of T tiles (no coordinate augmentation): one sparse map each."""
    rng = np.random.default_rng([cfg["seed"], len(bag.features)])
    chunks = _chunks(bag, cfg["n_tiles"], cfg["export_chunks"], rng)
    coords = bag.coords.numpy().astype(np.float64)
    return [(to_cells(coords[c], cell), bag.features[torch.from_numpy(c)]) for c in chunks]


@torch.no_grad()
def slide_embedding(net: GigaSSLNet, bag: Bag, cfg: dict[str, Any], cell: float, device: torch.device):
    """h averaged over chunks of T tiles, L2-normalised."""
    h = net.pool(build_batch(_export_maps(bag, cfg, cell)).tensor(device)).float().mean(0)
    return F.normalize(h, dim=0).cpu().numpy()


RECALIBRATION_SLIDES = 16  # slides per forward pass when BatchNorm statistics are recomputed


@torch.no_grad()
def recalibrate_batchnorm(net: GigaSSLNet, bags: Iterable[Bag], maker: ViewMaker, cfg: dict[str, Any],
                          device: torch.device) -> None:  # fmt: skip
    """Recompute the pooling network's BatchNorm statistics over these slides' export chunks (a
    cumulative average, as `torch.optim.swa_utils.update_bn` does): `export_bn: recalibrate`. The
    official export keeps training's running statistics (the default); docs/methods.md has the
    measured effect of recomputing them."""
    groups: list[list[tuple[Any, torch.Tensor]]] = [[]]
    for number, bag in enumerate(bags, start=1):
        groups[-1] += _export_maps(bag, cfg, maker.cell(bag))
        if number % RECALIBRATION_SLIDES == 0:
            groups.append([])
    groups = [maps for maps in groups if maps]
    if sum(len(maps) for maps in groups) < 2:  # BatchNorm needs two samples: keep training's statistics
        log.warning("one chunk of tiles in all: BatchNorm statistics kept from training")
        return
    norms = [m for m in net.pool.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    was_training = net.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    net.pool.train()
    for maps in groups:
        if len(maps) > 1:
            net.pool(build_batch(maps).tensor(device))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    net.train(was_training)


def split_probe(net: GigaSSLNet, bags: ViewMaker, split: dict[str, Any], cfg: dict[str, Any],
                device: torch.device) -> dict[str, float]:  # fmt: skip
    """A linear probe of the current encoder on a fold split: fitted on the training slides' embeddings,
    ROC-AUC on the validation (`val_auc`, what a sweep selects on) and test slides (`test_auc`, recorded)."""
    from slidestream.trainers.gigassl.probe import probe_auc

    ids = [*split["train"], *split["val"], *split["test"]]
    if cfg["export_bn"] == "recalibrate":  # on a copy: training goes on with its own statistics
        net = copy.deepcopy(net)
        recalibrate_batchnorm(net, (bags.cache.get(s) for s in ids), bags, cfg, device)
    was_training = net.training
    net.eval()
    embedded = {}
    for slide_id in ids:
        bag = bags.cache.get(slide_id)
        embedded[slide_id] = slide_embedding(net, bag, cfg, bags.cell(bag), device)
    net.train(was_training)

    def part(name: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = split[name]
        return np.stack([embedded[s] for s in chosen]), np.array([split["targets"][s] for s in chosen])

    train = part("train")
    return {
        f"{name}_auc": probe_auc(*train, *part(name), split["classes"]) if split[name] else float("nan")
        for name in ("val", "test")
    }


def export_embeddings(run_dir: str, views: str, output: str | None = None, export_chunks: int | None = None,
                      export_bn: str | None = None) -> str:  # fmt: skip
    """Per-slide embeddings of a finished run for every bag in `views` → Parquet `slide_id, embedding`.
    `export_chunks` / `export_bn` override the run's settings."""
    if not exists(join(run_dir, RESULT_FILE)):
        raise TrainDataError(f"{run_dir} has no finished Giga-SSL run ({RESULT_FILE} missing)")
    result = json.loads(read_bytes(join(run_dir, RESULT_FILE)))
    cfg = dict(result["gigassl"])
    if export_chunks is not None:
        cfg["export_chunks"] = export_chunks
    if export_bn is not None:
        cfg["export_bn"] = export_bn
    bags = FeatureBags(views, require_labels=False)
    if bags.dim != result["in_dim"]:
        raise TrainDataError(f"{views} holds {bags.dim}-d features; run {run_dir} was trained on "
                             f"{result['in_dim']}-d features")  # fmt: skip
    device = session.train_device()
    net = GigaSSLNet(result["in_dim"], cfg["dim"], cfg["proj_dim"])
    net.load_state_dict(session.load_weights(join(run_dir, WEIGHTS_FILE)))
    net.to(device).eval()
    maker = ViewMaker(BagCache(bags, 0), cfg)
    if cfg.get("export_bn", "running") == "recalibrate":  # runs trained before the setting: as they were
        recalibrate_batchnorm(net, bags, maker, cfg, device)
    ids, rows = [], []
    for bag in bags:
        ids.append(bag.slide_id)
        rows.append(slide_embedding(net, bag, cfg, maker.cell(bag), device))
    values = np.stack(rows).astype(np.float32)
    table = pa.table(
        {"slide_id": pa.array(ids, pa.string()),
         "embedding": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])},
    ).replace_schema_metadata({"slidestream.run": run_dir, "slidestream.views": views})  # fmt: skip
    target = output or join(run_dir, EMBEDDINGS_FILE)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(target, buffer.getvalue())
    return target


def tile_features_for(views: str) -> str | None:
    """The plain feature bags made with the same encoder and tiling as a views set
    (`OUT/gigassl/<key>-vAxB` → `OUT/features/<key>`), when they exist."""
    match = re.fullmatch(r"(.*)/gigassl/(.+)-v\d+x\d+/?", views)
    if match is None:
        return None
    features = join(match.group(1), "features", match.group(2))
    return features if exists(features) else None


# -- driver -------------------------------------------------------------------------------------------------


@dataclass
class GigaSSLSummary:
    name: str
    run_dir: str
    history: list[dict[str, float]]
    embeddings: str


class GigaSSLRun:
    """One named Giga-SSL run under an output root: plan, Ray Train fit (resumable), export."""

    def __init__(
        self, name: str, out: str, views: str, config: Config, export_from: str | None = None
    ) -> None:
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise TrainDataError(f"--name must be a plain name (no slashes), got {name!r}")
        self.name, self.views, self.config = name, views, config
        # embeddings come from the slides' un-augmented tiles when their bags exist (as at inference)
        self.export_from = export_from or tile_features_for(views) or views
        self.cfg: GigaSSLConfig = config.gigassl
        self.run_dir = join(out, "runs", name)
        bags = FeatureBags(views, require_labels=False)
        self.slide_ids, self.in_dim = list(bags.slide_ids), bags.dim
        global_batch(len(self.slide_ids), self.cfg.batch_size, worker_count(self.cfg))
        schedule_epochs(self.cfg.model_dump())
        layer4_weights(self.cfg.init_weights)

    def plan(self) -> dict[str, Any]:
        cfg = {k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in _FREE_KEYS}
        return {"kind": "gigassl", "views": self.views, "slides": self.slide_ids, "in_dim": self.in_dim,
                "gigassl": cfg}  # fmt: skip

    def execute(self) -> GigaSSLSummary:
        ensure_ray(self.config.ray)
        write_or_check_plan(self.run_dir, self.name, self.plan(), self.config)
        job = GigaSSLJob(self.name, self.views, self.slide_ids, self.in_dim, self.run_dir,
                         self.cfg.model_dump(mode="json"))  # fmt: skip
        result_uri = join(self.run_dir, RESULT_FILE)
        fit_once(train_gigassl, asdict(job), self.name, self.cfg, join(self.run_dir, "ray"), result_uri)
        history = json.loads(read_bytes(join(self.run_dir, RESULT_FILE)))["history"]
        if history:  # gigassl.epochs=0: the network at its initialisation, no curve to draw
            from slidestream.trainers.viz import training_curves

            training_curves({self.name: history}, join(self.run_dir, "curves.png"), metrics=("train_loss",))
        embeddings = export_embeddings(self.run_dir, self.export_from, export_chunks=self.cfg.export_chunks,
                                       export_bn=self.cfg.export_bn)  # fmt: skip
        return GigaSSLSummary(self.name, self.run_dir, history, embeddings)


# -- the method table's entries (`slidestream train gigassl`) ------------------------------------------------


def run_gigassl(request: TrainRequest, config: Config) -> GigaSSLSummary:
    """Train on the views `request.feature_dir`, then export the slides' embeddings."""
    assert request.feature_dir  # the command line made sure of it (the method table)
    cfg = config.gigassl
    print(
        f"train gigassl: {cfg.epochs} epochs (of a {cfg.schedule_epochs or cfg.epochs}-epoch schedule), "
        f"batch {cfg.batch_size} slides × 2 views × T={cfg.n_tiles} "
        f"over {worker_count(cfg)} worker(s), on {request.feature_dir} → {request.run_dir}"
    )
    return GigaSSLRun(request.name, request.out, request.feature_dir, config).execute()


def format_gigassl(summary: GigaSSLSummary) -> str:
    if not summary.history:
        untrained = "  no training (gigassl.epochs=0): the network at its initialisation"
        return f"{untrained}\n  embeddings: {summary.embeddings}"
    last = summary.history[-1]
    return (
        f"  final loss {last['train_loss']:.4f} ({last['slides_per_s']:.1f} slides/s)\n"
        f"  embeddings: {summary.embeddings}"
    )


def export_run(request: TrainRequest, config: Config) -> str:
    """`--export`: no training; the embeddings of the finished run for `--features`, by default the
    un-augmented tiles of the views' slides (else the views)."""
    assert request.feature_dir  # the command line made sure of it (the method table)
    bags = request.features or tile_features_for(request.feature_dir) or request.feature_dir
    cfg = config.gigassl
    target = export_embeddings(
        request.run_dir, bags, export_chunks=cfg.export_chunks, export_bn=cfg.export_bn
    )
    return f"embeddings of {bags} with run {request.name} → {target}"
