"""Embedding benchmark: does `slidestream run` keep its encoder busy?

Three measurements over the same tiles, in one process:
1. encoder alone: the tiles preloaded in memory as uint8 arrays, `TileEncoder.embed` in batches, with
   torch using every core;
2. pipeline: `run_ingest(..., embed=...)`: read, decode, shard-write and embed in one Ray Data stream;
3. CLAM-style baseline: in the main process, per slide `read_region` per tile → resize → encode in batches
   (torch with all cores, as such scripts run).

Efficiency = pipeline tiles/s ÷ encoder-alone tiles/s (target ≥ 0.85 on CPU: reading and decoding hidden
behind the encoder). A small VM's speed can swing by a fifth within minutes, so the two are interleaved:
`--rounds` pipeline runs, each between two encoder-alone passes (A P A P A …); a round's efficiency is its
run against the mean of the passes either side of it, and the figure to read is the median over rounds.
Also prints pipeline ÷ CLAM-style (one CLAM pass after the rounds, against the last round's run).

Last, where the CPU went during the pipeline runs, per group of processes (sampled with psutil every
second, summed over the rounds): per round, efficiency = the cores the encoder actor got ÷ the cores the
encoder alone used, × the encoder alone's CPU per tile ÷ the actor's. The first factor is a share of the
machine, little moved by its speed; the second compares two phases minutes apart and carries the drift.

    python bench/embed.py [--encoder resnet18_trunc] [--slides 4] [--size tiny] [--batch 64] [--rounds 3]
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

from slidestream.cluster.config import load_config
from slidestream.cluster.runtime import ensure_ray
from slidestream.pipelines.embed import EmbedStage, cpu_threads, with_input_px
from slidestream.pipelines.encoder_tiling import encoder_tiling
from slidestream.pipelines.encoders import build_encoder
from slidestream.pipelines.ingest import planned_chunks, run_ingest
from slidestream.pipelines.reader import read_tile, read_tiles, resize_tile
from slidestream.pipelines.synthetic import write_dataset

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
    for _, handle, chunk, plan in planned_chunks(slides, config):
        pixels = read_tiles(handle, chunk["xs"], chunk["ys"], plan)
        tiles += [resize_tile(t, input_px) for t in pixels]
    return np.stack(tiles)


def clam_style(slides: str, config, encoder, batch: int) -> tuple[int, float]:
    started, count, pending = time.perf_counter(), 0, []
    for _, handle, chunk, plan in planned_chunks(slides, config):
        for x, y in zip(chunk["xs"], chunk["ys"], strict=True):
            pending.append(resize_tile(read_tile(handle, x, y, plan), encoder.info.feed_px))
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


@dataclass
class Round:
    """One pipeline run and the encoder-alone passes either side of it."""

    tiles: int
    seconds: float
    alone: EncoderAlone  # the mean of the passes before and after
    cpu: dict[str, float]  # CPU seconds per process group during the run

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds

    @property
    def efficiency(self) -> float:
        return self.tiles_per_s / self.alone.tiles_per_s

    def factors(self) -> tuple[float, float]:
        """(the actor's cores ÷ the encoder alone's, the alone's CPU per tile ÷ the actor's)."""
        actor = self.cpu[ENCODER_ACTOR]
        return actor / self.seconds / self.alone.cores, self.alone.cpu_s_per_tile / (actor / self.tiles)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", default="resnet18_trunc")
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=3, help="pipeline runs, each between two encoder-alone passes"
    )
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
    config = encoder_tiling(load_config(None, [*overrides, *args.overrides]), args.encoder)
    slides = str(work / "slides")
    print(f"writing {args.slides} {args.size} synthetic slides …", flush=True)
    write_dataset(slides, args.slides, seed=3, size=args.size, fmt="svs")

    stage = EmbedStage(args.encoder, "random", config.tiling, config.embed)
    encoder = build_encoder(args.encoder, "random", config.embed.seed)
    encoder.info = with_input_px(encoder.info, config.embed.input_px)
    tiles = preload(slides, config, encoder.info.feed_px)
    threads = os.cpu_count() or 1  # the encoder alone at its best on this machine

    def alone_pass() -> EncoderAlone:
        torch.set_num_threads(threads)
        return encoder_alone(encoder, tiles, args.batch)

    torch.set_num_threads(threads)
    encoder.embed(tiles[: args.batch], batch_size=args.batch)  # warm-up
    ensure_ray(config.ray)
    # one slide first: starts the Ray workers and imports what they need, so every timed run is warm
    run_ingest(subset(slides, 1, work / "one"), str(work / "warmup"), config, embed=stage)

    passes, rounds = [alone_pass()], []
    for i in range(args.rounds):
        with CpuMonitor(CPU_GROUPS) as cpu:
            report = run_ingest(slides, str(work / f"pipeline-{i}"), config, embed=stage)
        assert report.tiles == len(tiles) and not report.failed, report.summary()
        passes.append(alone_pass())
        alone = passes[-2].averaged_with(passes[-1])
        rounds.append(Round(report.tiles, report.seconds, alone, cpu.by_group()))
        print(f"round {i + 1}: efficiency {rounds[-1].efficiency:.2f}", flush=True)

    n, seconds = clam_style(slides, config, encoder, args.batch)
    clam = n / seconds

    print(
        f"\nencoder {stage.info.key}, input {encoder.info.input_px} px, batch {args.batch}, "
        f"{len(tiles)} tiles, CPU; pipeline: {config.embed.actors} actor(s) × "
        f"{cpu_threads(config.embed)} thread(s); encoder alone: {threads} thread(s)"
    )
    print(
        "| round | encoder alone: before / after (mean), tiles/s | `slidestream run`, tiles/s | efficiency "
        "| actor's cores ÷ alone's | alone's CPU/tile ÷ actor's |"
    )
    print(
        "|-------|-----------------------------------------------|----------------------------|------------"
        "|-------------------------|----------------------------|"
    )
    for i, r in enumerate(rounds):
        got, per_tile = r.factors()
        before, after = passes[i].tiles_per_s, passes[i + 1].tiles_per_s
        alone_cell = f"{before:.1f} / {after:.1f} ({r.alone.tiles_per_s:.1f})"
        print(
            f"| {i + 1:>5} | {alone_cell:<45} | {r.tiles_per_s:>26.1f} | {r.efficiency:>10.2f} "
            f"| {got:>23.2f} | {per_tile:>26.2f} |"
        )
    efficiencies = [r.efficiency for r in rounds]
    print(
        f"\nefficiency pipeline / encoder alone, median of {len(rounds)} round(s): "
        f"{np.median(efficiencies):.2f}  (target ≥ 0.85; rounds {min(efficiencies):.2f}–"
        f"{max(efficiencies):.2f})"
    )
    print(
        f"CLAM-style serial (read_region+embed): {clam:.1f} tiles/s; last run / CLAM-style: "
        f"{rounds[-1].tiles_per_s / clam:.2f}×"
    )
    print_cpu_breakdown(rounds)
    shutil.rmtree(work, ignore_errors=True)


def print_cpu_breakdown(rounds: list[Round]) -> None:
    seconds = sum(r.seconds for r in rounds)
    groups = {name: sum(r.cpu[name] for r in rounds) for name in rounds[0].cpu}
    capacity = (os.cpu_count() or 1) * seconds
    print(f"\nwhere the CPU went during the pipeline runs ({seconds:.0f} s × {os.cpu_count()} cores):")
    print("| processes                                             | CPU-s | share of the machine |")
    print("|-------------------------------------------------------|-------|----------------------|")
    for name, used in [*groups.items(), ("idle", capacity - sum(groups.values()))]:
        print(f"| {name:<53} | {used:>5.1f} | {used / capacity:>19.1%} |")
    alone_cores = np.mean([r.alone.cores for r in rounds])
    print(
        f"encoder actor: {groups[ENCODER_ACTOR] / seconds:.2f} cores busy against {alone_cores:.2f} for the "
        "encoder alone"
    )


if __name__ == "__main__":
    main()
