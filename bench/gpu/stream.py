"""Checks 3 and 4: the embedding pipeline end to end, with one encoder actor on the GPU and the other
cores reading and decoding.

Synthetic slides are written on the machine. Check 4 first: `slidestream run` (`run_ingest` with an
`EmbedStage`): read from the slides, tissue, tiles, shards and features in one stream. Then check 3:
`slidestream embed` (`run_embed`) from the shards check 4 committed, for the same encoder with another
random seed (its own feature directory, so nothing is skipped). Both after a one-slide warm-up run (Ray
workers started, imports done); each run's wall time includes its actor's start (model build, CUDA
context), as a user's run does. GPU utilisation is sampled through NVML every 0.2 s during each run.
Efficiency = tiles/s ÷ `--ceiling` (the encoder alone at the same batch, check 1), when given.
Also the steady rate: the tiles of the slides committed after the first one ÷ the time from the first
commit to the last, which leaves out the run's fixed costs (Ray Data start, the actor's start, the first
slide's plan and read); it needs many slides to mean much, and overstates a little (the first slide's
tiles were partly read before its commit).

    python bench/gpu/stream.py [--slides 8] [--copies 1] [--size small] [--encoder resnet50_trunc]
                               [--batch 256] [--ceiling TILES_PER_S] [--input-px N] [--json FILE]
                               [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from common import GpuSampler, write_result

from slidestream.cluster.config import load_config
from slidestream.cluster.runtime import ensure_ray
from slidestream.pipelines.embed import EmbedStage, run_embed
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.ledger import LedgerEntry
from slidestream.pipelines.stream import IngestReport
from slidestream.pipelines.synthetic import write_dataset


class CommitClock:
    """Progress callback: when each slide's ledger entry was committed, and its tiles."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.commits: list[tuple[float, int]] = []

    def first_commit_s(self) -> float | None:
        """Seconds from the run's start to its first slide commit: the fixed costs and one slide's work."""
        return self.commits[0][0] - self.started if self.commits else None

    def __call__(self, entry: LedgerEntry) -> None:
        self.commits.append((time.perf_counter(), entry.n_tiles))

    def steady_tiles_per_s(self) -> float | None:
        if len(self.commits) < 3:
            return None
        (first, _), (last, _) = self.commits[0], self.commits[-1]
        return sum(n for _, n in self.commits[1:]) / (last - first)


def row(report: IngestReport, sampler: GpuSampler, clock: CommitClock, ceiling: float | None) -> dict:
    assert not report.failed, report.failed
    rate = report.tiles / report.seconds
    return {
        "steady_tiles_per_s": clock.steady_tiles_per_s(),
        "first_commit_s": clock.first_commit_s(),
        "slides": len(report.ok),
        "tiles": report.tiles,
        "seconds": report.seconds,
        "tiles_per_s": rate,
        "efficiency": rate / ceiling if ceiling else None,
        "gpu_util_mean_pct": sampler.mean(),
        "gpu_util_samples": len(sampler.samples),
    }


def link_copies(written: Path, slides: Path, copies: int) -> None:
    """Each written slide `copies` times under its own name (hard links): slide ids come from file names,
    so every copy is a slide of its own to the pipeline, at no cost in writing time or disk."""
    slides.mkdir()
    for path in sorted(written.glob("*.svs")):
        for k in range(copies):
            os.link(path, slides / f"{path.stem}-copy{k}{path.suffix}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "large"])
    parser.add_argument("--encoder", default="resnet50_trunc")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--input-px", type=int, default=None)
    parser.add_argument("--ceiling", type=float, default=None)
    parser.add_argument(
        "--copies",
        type=int,
        default=1,
        help="hard links per written slide, under other names: many slides cheaply",
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    overrides = [f"ray.num_cpus={cores}", f"embed.batch_size={args.batch}", *args.overrides]
    if args.input_px:
        overrides.append(f"embed.input_px={args.input_px}")
    config = load_config(None, overrides)
    work = Path(tempfile.mkdtemp(prefix="gpu-stream-"))
    started = time.perf_counter()
    write_dataset(str(work / "written"), args.slides, seed=11, size=args.size, fmt="svs")
    link_copies(work / "written", work / "slides", args.copies)
    write_dataset(str(work / "warm"), 1, seed=12, size="tiny", fmt="svs")
    result: dict = {"slides_written_s": time.perf_counter() - started, "cores": cores, "batch": args.batch}

    ensure_ray(config.ray)
    run_stage = EmbedStage(args.encoder, "random", config.tiling, config.embed)
    run_ingest(str(work / "warm"), str(work / "out-warm"), config, embed=run_stage)
    clock = CommitClock()
    with GpuSampler() as sampler:
        report = run_ingest(
            str(work / "slides"), str(work / "out"), config, embed=run_stage, progress_callback=clock
        )
    result["run"] = row(report, sampler, clock, args.ceiling)
    print(f"run: {result['run']}", flush=True)

    embed_config = load_config(None, [*overrides, "embed.seed=1"])
    embed_stage = EmbedStage(args.encoder, "random", embed_config.tiling, embed_config.embed)
    clock = CommitClock()
    with GpuSampler() as sampler:
        report = run_embed(str(work / "out"), embed_config, embed_stage, progress_callback=clock)
    result["embed"] = row(report, sampler, clock, args.ceiling)
    print(f"embed: {result['embed']}", flush=True)
    result["encoder"] = run_stage.info.key
    write_result(args.json, result)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
