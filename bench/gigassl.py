"""Giga-SSL training step time: 1 vs 2 Ray Train workers at a constant global batch, slides/s.

The real trainer (`trainers.gigassl.train_gigassl` through `fit_loop`: Ray Train, gloo on CPU, NCCL on
GPU) on synthetic view bags written to disk with our writer (`--slides` slides, `--naug` augmentations ×
`--nt` tiles, `--dim`-d features on a `--grid`-cell tile grid). One epoch = one step of the whole global
batch (`--slides` = `gigassl.batch_size`, default 256 slides × 2 views × T = 5 tiles), so the trainer's
own `epoch_s` (views, sparse maps, forward, the gathered NT-Xent, backward, all-reduce, optimizer step;
averaged over the ranks) is the step time; the first `--warmup` epochs (first bag reads, warm-up) are
left out and the median of the others is reported. Ray start-up, checkpoints and export are not timed.
With 1 worker the worker holds all 256 slides; with 2 each holds 128 and the projections are gathered.
Every worker has `--cpus-per-worker` CPUs (one torch thread each on CPU).

    python bench/gigassl.py [--slides 256] [--nt 5] [--epochs 5] [--warmup 1] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from slidestream.cluster.config import load_config
from slidestream.cluster.runtime import ensure_ray
from slidestream.pipelines.features import BagMeta, bag_table, write_bag
from slidestream.trainers.gigassl.train import RESULT_FILE, GigaSSLRun


def write_views(root: Path, args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    meta = BagMeta("synthetic", args.dim, 0.5, 256, "bench")
    rows = args.naug * args.tiles_per_aug
    for i in range(args.slides):
        xy = rng.integers(0, args.grid, size=(rows, 2)) * 512
        feats = rng.normal(size=(rows, args.dim)).astype(np.float32)
        aug = np.repeat(np.arange(args.naug), args.tiles_per_aug)
        write_bag(str(root / f"slide{i:04d}.parquet"), bag_table(xy[:, 0], xy[:, 1], feats, meta, aug=aug))


def run(workers: int, views: Path, out: Path, args: argparse.Namespace) -> dict:
    config = load_config(None, [
        f"ray.num_cpus={args.num_cpus}", f"gigassl.workers={workers}", f"gigassl.epochs={args.epochs}",
        f"gigassl.batch_size={args.slides}", f"gigassl.n_tiles={args.nt}", "gigassl.warmup_epochs=1",
        f"gigassl.cpus_per_worker={args.cpus_per_worker}", "gigassl.export_chunks=1",
        "gigassl.init_weights=random",  # the step time does not depend on the starting weights
    ])  # fmt: skip
    name = f"bench-w{workers}"
    started = time.perf_counter()
    GigaSSLRun(name, str(out), str(views), config).execute()
    total = time.perf_counter() - started
    history = json.loads((out / "runs" / name / RESULT_FILE).read_text())["history"]
    steps = [h["epoch_s"] for h in history[args.warmup :]]
    step = statistics.median(steps)
    return {"workers": workers, "first_s": history[0]["epoch_s"], "step_s": step,
            "slides_per_s": args.slides / step, "steps": len(steps), "wall_s": total}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slides", type=int, default=256, help="slides = the global batch (one step/epoch)")
    parser.add_argument("--nt", type=int, default=5, help="T: tiles per view")
    parser.add_argument("--naug", type=int, default=8)
    parser.add_argument("--tiles-per-aug", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--grid", type=int, default=40, help="tile grid cells per axis of a slide")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-gigassl-") as tmp:
        views = Path(tmp) / "views"
        write_views(views, args)
        ensure_ray(load_config(None, [f"ray.num_cpus={args.num_cpus}"]).ray)
        rows = [run(w, views, Path(tmp) / "out", args) for w in args.workers]
    base = rows[0]
    print(f"\nGiga-SSL training step, global batch {args.slides} slides × 2 views × T={args.nt}, "
          f"{args.dim}-d tiles, device {device}, {args.cpus_per_worker:g} CPU/worker")  # fmt: skip
    head = f"vs {base['workers']} worker"
    print(f"{'workers':>7} {'first epoch s':>13} {'step s (median)':>15} {'slides/s':>9} {head:>12}")
    for r in rows:
        ratio = base["step_s"] / r["step_s"]
        cells = f"{r['first_s']:>13.2f} {r['step_s']:>15.2f} {r['slides_per_s']:>9.1f} {ratio:>11.2f}×"
        print(f"{r['workers']:>7} {cells}")


if __name__ == "__main__":
    main()
