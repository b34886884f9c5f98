"""Ingest benchmark: the Ray Data pipeline against a naive serial loop, same slides, same run.

Baselines, one process each: for each slide, open it, find tissue (same planning as the pipeline), then
per tile `read_region` → resize → JPEG encode → append to a tar. The naive loop resizes as a plain
script does (`Image.resize`, PIL's default filter); the second loop uses slidestream's own per-tile
reader function (exact box reduction), so against it only parallelism and batched reads count.
Pipeline: `run_ingest` on a local Ray instance with the machine's cores.

Prints tiles/s and MB/s (tile bytes written) for slides on local disk and on the S3 server, the ratio
pipeline / baseline, and the peak memory of the whole process tree for 4 vs 16 slides.

With `--format ome-tiff|ndpi|dicom|tiff`, it compares that format with SVS instead: the same slides written in
both, the pipeline's tiles/s on local disk and from S3, and the bytes and GETs per tile a reader fetches
from S3 (all of a cohort's tiles read in this process, where the fetches can be counted).

    python bench/ingest.py [--size small] [--slides 4] [--no-s3] [--format dicom]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import webdataset as wds
from PIL import Image

from slidestream.cluster.config import load_config
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import filesystem, join
from slidestream.pipelines.ingest import planned_chunks, run_ingest
from slidestream.pipelines.reader import read_tile, read_tiles
from slidestream.pipelines.shards import encode_image, tile_key
from slidestream.pipelines.synthetic import SLIDE_FORMATS, write_dataset
from slidestream.pipelines.tiling import ReadPlan


class PeakMemory:
    """Peak resident memory of this process and all its descendants (Ray's raylet, workers, object store)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _naive_tile(handle, x: int, y: int, plan: ReadPlan):
    """How a plain script reads a tile: read_region, then PIL's default resize."""
    region = Image.fromarray(handle.read_region((x, y), plan.level, (plan.read_px, plan.read_px)))
    return np.asarray(region.resize((plan.tile_px, plan.tile_px)))


def baseline(slides_uri: str, out_uri: str, config, naive: bool) -> tuple[int, int, float]:
    """Serial loop: plan each slide, then read_region / resize / encode / tar-write tile by tile.

    `naive`: resize as a plain script does (PIL's default filter); otherwise with slidestream's own
    reader function (`read_tile`, exact box reduction), i.e. only the pipeline's parallelism and batched
    reads differ.
    """
    started = time.perf_counter()
    tiles = written = 0
    archives: dict[str, tuple[io.BytesIO, wds.TarWriter]] = {}  # one tar per slide
    for slide, handle, chunk, plan in planned_chunks(slides_uri, config):
        if slide.slide_id not in archives:
            buffer = io.BytesIO()
            archives[slide.slide_id] = (buffer, wds.TarWriter(buffer))
        sink = archives[slide.slide_id][1]
        for x, y in zip(chunk["xs"], chunk["ys"], strict=True):
            pixels = _naive_tile(handle, x, y, plan) if naive else read_tile(handle, x, y, plan)
            image = encode_image(pixels, config.shards)
            sink.write({"__key__": tile_key(slide.slide_id, x, y), "jpg": image})
            tiles += 1
            written += len(image)
    for slide_id, (buffer, sink) in archives.items():
        sink.close()
        fs, path = filesystem(join(out_uri, f"{slide_id}.tar"))
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.pipe_file(path, buffer.getvalue())
    return tiles, written, time.perf_counter() - started


def pipeline(slides_uri: str, out_uri: str, config) -> tuple[int, int, float, int]:
    with PeakMemory() as memory:
        report = run_ingest(slides_uri, out_uri, config)
    assert not report.failed, report.summary()
    return report.tiles, report.shard_bytes, report.seconds, memory.peak


def fetched_per_tile(slides_uri: str, config) -> tuple[int, float, float, float]:
    """Every planned tile of the cohort read in this process: (tiles, seconds, bytes and GETs per tile)."""
    from slidestream.testing.fetched import s3_fetches

    tiles = 0
    with s3_fetches() as fetched:
        started = time.perf_counter()
        for _, handle, chunk, plan in planned_chunks(slides_uri, config):
            tiles += sum(1 for _ in read_tiles(handle, chunk["xs"], chunk["ys"], plan))
        seconds = time.perf_counter() - started
    return tiles, seconds, fetched.bytes / tiles, fetched.requests / tiles


def compare_formats(fmt: str, args: argparse.Namespace, work: Path, config) -> None:
    """The same slides in SVS and in `fmt`: pipeline tiles/s locally and from S3, S3 bytes per tile."""
    import os

    import ray

    from slidestream.testing.s3server import start_s3_server, stop_s3_server

    server = start_s3_server()
    os.environ.update(server.env())
    server.make_bucket("bench")
    fs, _ = filesystem("s3://bench")
    ray.shutdown()  # restart so workers get the S3 endpoint in their environment
    ensure_ray(config.ray)
    ncpu = psutil.cpu_count()
    rows = []
    for name in ("svs", fmt):
        local = work / f"slides-{name}"
        print(f"writing {args.slides} {args.size} {name} slides …", flush=True)
        write_dataset(str(local), args.slides, seed=1, size=args.size, fmt=name)
        fs.put(str(local), f"bench/slides-{name}", recursive=True)
        for where, uri in (("local", str(local)), ("s3", f"s3://bench/slides-{name}")):
            pipeline(uri, str(work / f"warm-{name}-{where}"), config)  # starts and imports the workers
            tiles, _, seconds, _ = pipeline(uri, str(work / f"out-{name}-{where}"), config)
            label = f"{where}, pipeline, {ncpu} cores"
            rows.append(f"| {name:<8} | {label:<26} | {tiles:>6} | {seconds:>7.1f} | "
                        f"{tiles / seconds:>7.1f} |                 |           |")  # fmt: skip
        tiles, seconds, per_tile, gets = fetched_per_tile(f"s3://bench/slides-{name}", config)
        rows.append(f"| {name:<8} | s3, one process            | {tiles:>6} | {seconds:>7.1f} | "
                    f"{tiles / seconds:>7.1f} | {per_tile / 1e3:>15.1f} | {gets:>9.2f} |")  # fmt: skip
    header = ["format", "where", "tiles", "seconds", "tiles/s", "KB fetched/tile", "GETs/tile"]
    widths = [8, 26, 6, 7, 7, 15, 9]
    print("\n| " + " | ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print("\n".join(rows))
    stop_s3_server(server)


def row(label: str, tiles: int, nbytes: int, seconds: float) -> str:
    rate, mbs = tiles / seconds, nbytes / 1e6 / seconds
    return f"| {label:<34} | {tiles:>7} | {seconds:>8.1f} | {rate:>8.1f} | {mbs:>7.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", choices=["tiny", "small", "large"])
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument(
        "--memory-size",
        default="small",
        choices=["tiny", "small"],
        help="slide size for the 4 vs 16 slides memory comparison",
    )
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument(
        "--format",
        dest="fmt",
        default="svs",
        choices=SLIDE_FORMATS,
        help="compare this slide format with SVS (tiles/s, bytes fetched per tile from S3)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the 4 vs 16 slides memory comparison")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    config = load_config(None, ["ray.object_store_mb=1024"])
    if args.fmt != "svs":
        compare_formats(args.fmt, args, work, config)
        shutil.rmtree(work, ignore_errors=True)
        return
    print(f"writing {args.slides} {args.size} synthetic slides …", flush=True)
    write_dataset(str(work / "slides"), args.slides, seed=1, size=args.size, fmt="svs")
    ensure_ray(config.ray)
    ncpu = psutil.cpu_count()

    results = []
    n0, b0, s0 = baseline(str(work / "slides"), str(work / "naive"), config, naive=True)
    results.append(("local: naive serial loop", n0, b0, s0))
    n, b, s = baseline(str(work / "slides"), str(work / "baseline"), config, naive=False)
    results.append(("local: serial loop, our reader fn", n, b, s))
    ratios = {}
    for run in ("cold", "warm"):  # cold: the first run starts and imports its Ray workers
        n2, b2, s2, _ = pipeline(str(work / "slides"), str(work / f"pipeline-{run}"), config)
        results.append((f"local: pipeline, {ncpu} cores, {run}", n2, b2, s2))
        assert n == n2, f"baseline and pipeline disagree on the tile count ({n} vs {n2})"
        ratios[f"local, {run}, vs naive loop"] = (n2 / s2) / (n0 / s0)
        ratios[f"local, {run}, vs loop with our reader fn"] = (n2 / s2) / (n / s)

    server = None
    if not args.no_s3:
        from slidestream.testing.s3server import start_s3_server, stop_s3_server

        server = start_s3_server()
        import os

        os.environ.update(server.env())
        server.make_bucket("bench")
        fs, _ = filesystem("s3://bench")
        for path in sorted((work / "slides").glob("*.svs")):
            fs.put_file(str(path), f"bench/slides/{path.name}")
        import ray

        ray.shutdown()  # restart so workers get the S3 endpoint in their environment
        ensure_ray(config.ray)
        n, b, s = baseline("s3://bench/slides", "s3://bench/baseline", config, naive=True)
        results.append(("s3: naive serial loop", n, b, s))
        for run in ("cold", "warm"):
            n2, b2, s2, _ = pipeline("s3://bench/slides", f"s3://bench/pipeline-{run}", config)
            results.append((f"s3: pipeline, {ncpu} cores, {run}", n2, b2, s2))
            ratios[f"s3, {run}, vs naive loop"] = (n2 / s2) / (n / s)

    print("\n| run                                |   tiles |  seconds |  tiles/s |    MB/s |")
    print("|------------------------------------|---------|----------|----------|---------|")
    for label, n, b, s in results:
        print(row(label, n, b, s))
    for where, ratio in ratios.items():
        print(f"\npipeline / baseline ({where}): {ratio:.2f}×  (target ≥ 3×)")

    if not args.no_memory:
        peaks = {}
        for count in (4, 16):
            slides = work / f"mem{count}"
            write_dataset(str(slides), count, seed=2, size=args.memory_size, fmt="svs")
            *_, peaks[count] = pipeline(str(slides), str(work / f"mem{count}-out"), config)
        print("\n| slides | peak RSS of the process tree (MB) |")
        print("|--------|-----------------------------------|")
        for count, peak in peaks.items():
            print(f"| {count:>6} | {peak / 2**20:>33.0f} |")
        print(f"\npeak memory 16 / 4 slides: {peaks[16] / peaks[4]:.2f}  (target ≤ 1.20)")

    if server is not None:
        stop_s3_server(server)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
