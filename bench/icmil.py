"""ICMIL benchmark: embedder fine-tuning throughput (tiles/s) with 1 and 2 Ray Train workers, and on a GPU
the distillation step of ResNet-50 at 224 px in bf16.

1. Ray Train: synthetic slides are ingested into WebDataset shards, then the real fine-tuning loop
   (`trainers/icmil/finetune.py`, `finetune_embedder` through `fit_loop`: tiles streamed from the shards,
   clean + augmented views, the three KL terms, gradient all-reduce, a checkpoint per epoch) runs with 1
   and then 2 workers on the same shards (`icmil.cpus_per_worker=1`: one torch thread per worker).
   The frozen bag classifier is a freshly initialised ABMIL (throughput does not depend on its values).
   tiles/s = the loop's own count of training tiles ÷ the epoch's training time (all workers together),
   median over epochs 2+ (the first is shown apart: shard reads, warm-up); validation, reporting and Ray
   start-up are left out. The ratio is 2 workers ÷ 1 worker in the same run.
2. GPU (when CUDA is present): `distill_losses` + backward + Adam step for resnet50_trunc at 224 px, bf16
   autocast, channels-last, batch `--gpu-batch`, on random tiles already on the device: tiles/s, median
   over `--gpu-steps` timed steps after warm-up. Without a GPU the row says "not run (no device)".

    python bench/icmil.py [--slides 6] [--encoder resnet18_trunc] [--input-px 64] [--batch 32]
                          [--tiles-per-epoch 512] [--epochs 3] [--gpu-batch 100] [--gpu-steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("SLIDESTREAM_PROGRESS", "0")

from slidestream.cluster.config import with_values
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import join
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.synthetic import write_dataset
from slidestream.pipelines.tile_store import committed_shards, tiles_stage
from slidestream.testing.helpers import make_config
from slidestream.trainers.fit import fit_loop
from slidestream.trainers.icmil.finetune import RESULT_FILE, DistillJob, finetune_embedder
from slidestream.trainers.models import build_model


def prepare(work: Path, args: argparse.Namespace) -> tuple[Any, dict[str, list[str]], dict[str, int], str]:
    config = make_config("tiling.mpp=1.0", "tiling.tile_px=128", f"embed.input_px={args.input_px}")
    ensure_ray(config.ray)
    write_dataset(str(work / "slides"), args.slides, seed=1, size="tiny", fmt="svs")
    report = run_ingest(str(work / "slides"), str(work / "out"), config)
    shards = committed_shards(str(work / "out"), config.tiling)
    tiles = {e.slide_id: e.n_tiles for e in Ledger(str(work / "out")).entries(tiles_stage(config.tiling))}
    print(f"ingested {len(report.ok)} slides, {sum(tiles.values())} tiles of 128 px at 1 µm/px")
    from slidestream.pipelines.encoders import encoder_info

    dim = encoder_info(args.encoder, "random").dim
    mil_weights = str(work / "abmil.pt")
    torch.manual_seed(0)
    torch.save(build_model("abmil", dim, 2).state_dict(), mil_weights)
    return config, shards, tiles, mil_weights


def ray_run(work: Path, args: argparse.Namespace, prepared: tuple, workers: int) -> dict[str, Any]:
    config, shards, tiles, mil_weights = prepared
    from slidestream.pipelines.encoders import encoder_info

    icmil = with_values(config, {
        "icmil.workers": workers, "icmil.cpus_per_worker": 1, "icmil.batch_size": args.batch,
        "icmil.tiles_per_epoch": args.tiles_per_epoch, "icmil.epochs": args.epochs, "icmil.val_tiles": 1,
    }).icmil  # fmt: skip
    ids = sorted(shards)
    job = DistillJob(
        name=f"bench-{workers}w", encoder=args.encoder, encoder_weights="random", encoder_seed=0,
        input_px=args.input_px, model="abmil", model_options={}, mil_weights=mil_weights,
        dim=encoder_info(args.encoder, "random").dim, n_classes=2,
        train_shards=[u for s in ids[:-1] for u in shards[s]], val_shards=shards[ids[-1]],
        train_tiles=sum(tiles[s] for s in ids[:-1]), result_dir=str(work / f"result-{workers}w"),
        icmil=icmil.model_dump(mode="json"),
    )  # fmt: skip
    started = time.perf_counter()
    fit_loop(finetune_embedder, job.to_config(), job.name, icmil, str(work / "ray"))
    wall = time.perf_counter() - started
    import json

    history = json.loads(Path(join(job.result_dir, RESULT_FILE)).read_text())["history"]
    speeds = [h["tiles_per_s"] for h in history]
    return {
        "workers": workers,
        "first": speeds[0],
        "tiles_per_s": statistics.median(speeds[1:]) if len(speeds) > 1 else speeds[0],
        "tiles": history[-1]["tiles"],
        "wall": wall,
    }


def gpu_run(args: argparse.Namespace) -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        return None
    from slidestream.pipelines.encoders import build_encoder
    from slidestream.trainers.icmil.distill import InstanceTeacher, distill_losses, make_student

    device = torch.device("cuda")
    encoder = build_encoder("resnet50_trunc", "random", 0)
    mil = build_model("abmil", encoder.info.dim, 2)
    teacher = InstanceTeacher.from_mil(encoder, mil, "abmil").to(device)
    teacher.encoder.to(memory_format=torch.channels_last)
    student = make_student(teacher).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-5, weight_decay=1e-4)
    shape = (args.gpu_batch, 3, 224, 224)
    clean = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    aug = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    times = []
    for step in range(args.gpu_steps + 5):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses = distill_losses(teacher, student, clean, aug)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        torch.cuda.synchronize()
        if step >= 5:
            times.append(time.perf_counter() - started)
    return {
        "tiles_per_s": args.gpu_batch / statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "device": torch.cuda.get_device_name(),
    }


def device_of_run() -> str:
    """Where `fit_loop` puts the workers: a GPU each when the cluster has one, else CPU with gloo."""
    return "1 GPU per worker, NCCL" if torch.cuda.is_available() else "CPU, gloo"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--encoder", default="resnet18_trunc")
    parser.add_argument("--input-px", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="tiles per step and worker")
    parser.add_argument("--tiles-per-epoch", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts")
    parser.add_argument("--gpu-batch", type=int, default=100)
    parser.add_argument("--gpu-steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-icmil-") as tmp:
        work = Path(tmp)
        prepared = prepare(work, args)
        rows = [ray_run(work, args, prepared, workers) for workers in args.workers]
    print(f"\nfine-tuning {args.encoder} at {args.input_px} px, batch {args.batch}/worker, "
          f"{args.tiles_per_epoch} tiles/epoch, {args.epochs} epochs ({device_of_run()})")  # fmt: skip
    print(f"| {'workers':>7} | {'epoch 1 tiles/s':>15} | {'tiles/s (2+)':>12} | {'wall s':>7} |")
    print(f"|{'-' * 9}|{'-' * 17}|{'-' * 14}|{'-' * 9}|")
    for row in rows:
        cells = f"{row['first']:>15.1f} | {row['tiles_per_s']:>12.1f} | {row['wall']:>7.1f}"
        print(f"| {row['workers']:>7} | {cells} |")
    if args.workers == [1, 2]:
        print(f"ratio 2 workers ÷ 1 worker: {rows[1]['tiles_per_s'] / rows[0]['tiles_per_s']:.2f}×")
    gpu = gpu_run(args)
    if gpu is None:
        print("GPU: resnet50_trunc 224 px bf16 — not run (no device)")
    else:
        print(f"GPU ({gpu['device']}): resnet50_trunc 224 px bf16, batch {args.gpu_batch}: "
              f"{gpu['tiles_per_s']:.1f} tiles/s, peak {gpu['peak_gib']:.1f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
