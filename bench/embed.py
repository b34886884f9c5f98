"""Embedding benchmark: does `slidestream run` keep its encoder busy?

Three measurements over the same tiles, in one process:
1. encoder alone: the tiles preloaded in memory as uint8 arrays, `TileEncoder.embed` in batches, with
   torch using every core;
2. pipeline: `run_ingest(..., embed=...)`: read, decode, shard-write and embed in one Ray Data stream;
3. CLAM-style baseline: in the main process, per slide `read_region` per tile → resize → encode in batches
   (torch with all cores, as such scripts run).

Efficiency = pipeline tiles/s ÷ encoder-alone tiles/s (target ≥ 0.85 on CPU: reading and decoding hidden
behind the encoder). The encoder alone is measured before and after the pipeline and averaged, so that a
machine whose speed drifts during the run biases neither side. Also prints pipeline ÷ CLAM-style, and
the pipeline's marginal rate: the extra tiles of a run over all slides against a run over half of them,
divided by the extra seconds. The fixed cost of a run (the encoder actor's process importing torch and
timm, the first chunk's read) cancels in that difference; a run of many slides approaches it. Being a
difference of two runs, it is noisy on a small machine: read the end-to-end efficiency first.

Last, where the CPU went during the all-slides run, per group of processes (sampled with psutil every
second): efficiency = the cores the encoder actor got ÷ the cores the encoder alone used, × the encoder
alone's CPU per tile ÷ the actor's. What the other groups take is the ceiling of the first factor.

    python bench/embed.py [--encoder resnet18_trunc] [--slides 4] [--size tiny] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch
from cpu_monitor import CpuMonitor  # bench/, the script's folder

from cluster.config import load_config
from cluster.runtime import ensure_ray
from pipelines.embed import EmbedStage, cpu_threads, with_input_px
from pipelines.encoders import build_encoder
from pipelines.ingest import planned_chunks, run_ingest
from pipelines.reader import read_tile, read_tiles, resize_tile
from pipelines.synthetic import write_dataset

ENCODER_ACTOR = "encoder actor"
CPU_GROUPS = [
    (ENCODER_ACTOR, lambda pid, cmd: "EmbedActor" in cmd),
    ("driver (Ray Data's executor, commits, this monitor)", lambda pid, cmd: pid == os.getpid()),
    ("Ray task workers (plan, read, decode, write shards)",
     lambda pid, cmd: cmd.startswith("ray::IDLE") or "read_chunk" in cmd or "plan_slide" in cmd),
    ("Ray's own (raylet, GCS, agents, Ray Data actors)",
     lambda pid, cmd: cmd.startswith("ray::") or "/site-packages/ray/" in cmd),
]  # fmt: skip


def preload(slides: str, config, input_px: int) -> np.ndarray:
    tiles = []
    for slide, handle, chunk, plan in planned_chunks(slides, config):
        pixels = read_tiles(handle, slide.uri, chunk["xs"], chunk["ys"], plan)
        tiles += [resize_tile(t, input_px) for t in pixels]
    return np.stack(tiles)


def clam_style(slides: str, config, encoder, batch: int) -> tuple[int, float]:
    started, count, pending = time.perf_counter(), 0, []
    for _, handle, chunk, plan in planned_chunks(slides, config):
        for x, y in zip(chunk["xs"], chunk["ys"], strict=True):
            pending.append(resize_tile(read_tile(handle, x, y, plan), encoder.info.input_px))
            if len(pending) == batch:
                encoder.embed(np.stack(pending), batch_size=batch)
                count, pending = count + len(pending), []
    if pending:
        encoder.embed(np.stack(pending), batch_size=batch)
        count += len(pending)
    return count, time.perf_counter() - started


@dataclass
class EncoderAlone:
    tiles_per_s: float
    cpu_s_per_tile: float
    cores: float  # CPU seconds per second: how many cores it kept busy

    def averaged_with(self, other: EncoderAlone) -> EncoderAlone:
        return EncoderAlone(*((a + b) / 2 for a, b in zip(astuple(self), astuple(other), strict=True)))


def encoder_alone(encoder, tiles: np.ndarray, batch: int) -> EncoderAlone:
    wall, cpu = time.perf_counter(), time.process_time()
    encoder.embed(tiles, batch_size=batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return EncoderAlone(len(tiles) / wall, cpu / len(tiles), cpu / wall)


def subset(slides: str, n: int, where: Path) -> str:
    """A folder with the first `n` slides of `slides` (hard links)."""
    where.mkdir()
    for path in sorted(Path(slides).glob("*.svs"))[:n]:
        os.link(path, where / path.name)
    return str(where)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", default="resnet18_trunc")
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--input-px", type=int, default=None, help="encoder input size (default: the encoder's)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the pipeline run, e.g. --set embed.actors=2",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    overrides = ["ray.object_store_mb=1024", f"embed.batch_size={args.batch}", "embed.dtype=float32"]
    if args.input_px:
        overrides.append(f"embed.input_px={args.input_px}")
    config = load_config(None, [*overrides, *args.overrides])
    slides = str(work / "slides")
    print(f"writing {args.slides} {args.size} synthetic slides …", flush=True)
    write_dataset(slides, args.slides, seed=3, size=args.size, fmt="svs")

    stage = EmbedStage(args.encoder, "random", config.tiling, config.embed)
    encoder = build_encoder(args.encoder, "random", config.embed.seed)
    encoder.info = with_input_px(encoder.info, config.embed.input_px)
    tiles = preload(slides, config, encoder.info.input_px)

    threads = os.cpu_count() or 1  # the encoder alone at its best on this machine
    torch.set_num_threads(threads)
    encoder.embed(tiles[: args.batch], batch_size=args.batch)  # warm-up
    before = encoder_alone(encoder, tiles, args.batch)

    ensure_ray(config.ray)
    # one slide first: starts the Ray workers and imports what they need, so both timed runs are warm
    run_ingest(subset(slides, 1, work / "one"), str(work / "warmup"), config, embed=stage)
    half = run_ingest(
        subset(slides, args.slides // 2, work / "half"), str(work / "half-out"), config, embed=stage
    )
    with CpuMonitor(CPU_GROUPS) as cpu:
        report = run_ingest(slides, str(work / "pipeline"), config, embed=stage)
    assert report.tiles == len(tiles) and not report.failed, report.summary()
    pipeline = report.tiles / report.seconds
    # the fixed cost of a run (actor start, first read) cancels in the difference of the two runs
    marginal = (report.tiles - half.tiles) / (report.seconds - half.seconds)

    torch.set_num_threads(threads)
    after = encoder_alone(encoder, tiles, args.batch)
    alone = before.averaged_with(after)

    n, seconds = clam_style(slides, config, encoder, args.batch)
    clam = n / seconds

    print(
        f"\nencoder {stage.info.key}, input {encoder.info.input_px} px, batch {args.batch}, "
        f"{len(tiles)} tiles, CPU; pipeline: {config.embed.actors} actor(s) × "
        f"{cpu_threads(config.embed)} thread(s)"
    )
    print("| run                                   | tiles/s |")
    print("|---------------------------------------|---------|")
    print(f"| encoder alone, preloaded, {threads} thread(s) | {alone.tiles_per_s:>7.1f} |")
    print(f"|   before / after the pipeline         | {before.tiles_per_s:>3.1f} / {after.tiles_per_s:.1f} |")
    print(f"| slidestream run (read+shards+embed)   | {pipeline:>7.1f} |")
    print(f"|   marginal (all slides − half of them) | {marginal:>6.1f} |")
    print(f"| CLAM-style serial (read_region+embed) | {clam:>7.1f} |")
    print(f"\nefficiency pipeline / encoder alone: {pipeline / alone.tiles_per_s:.2f}  (target ≥ 0.85)")
    print(f"marginal efficiency (a long run's, the fixed start left out): {marginal / alone.tiles_per_s:.2f}")
    print(f"pipeline / CLAM-style: {pipeline / clam:.2f}×")
    print_cpu_breakdown(cpu, report.seconds, report.tiles, alone)
    shutil.rmtree(work, ignore_errors=True)


def print_cpu_breakdown(cpu: CpuMonitor, seconds: float, tiles: int, alone: EncoderAlone) -> None:
    groups = cpu.by_group()
    capacity = (os.cpu_count() or 1) * seconds
    print(f"\nwhere the CPU went during the all-slides run ({seconds:.0f} s × {os.cpu_count()} cores):")
    print("| processes                                             | CPU-s | share of the machine |")
    print("|-------------------------------------------------------|-------|----------------------|")
    for name, used in [*groups.items(), ("idle", capacity - sum(groups.values()))]:
        print(f"| {name:<53} | {used:>5.1f} | {used / capacity:>19.1%} |")
    actor = groups[ENCODER_ACTOR]
    got, per_tile = actor / seconds / alone.cores, alone.cpu_s_per_tile / (actor / tiles)
    actor_ms, alone_ms = 1000 * actor / tiles, 1000 * alone.cpu_s_per_tile
    print(
        f"encoder actor: {actor / seconds:.2f} cores busy against {alone.cores:.2f} for the encoder alone "
        f"({got:.2f}); CPU per tile {actor_ms:.0f} ms against {alone_ms:.0f} ms "
        f"({per_tile:.2f}); product {got * per_tile:.2f} ≈ the efficiency"
    )


if __name__ == "__main__":
    main()
