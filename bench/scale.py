"""Archive scale: how the costs that grow with the number of slides grow, at 1k / 10k / 100k slides.

No pixels where pixels do not matter: the archive is empty objects under realistic keys
(`site-07/2019/TCGA-…-DX1.svs`, one sidecar `.xml` per 20 slides), sparse files of realistic sizes on local
disk and 1-byte objects on the S3 test server. The ledger holds one `tiles/…` and one `features/…` entry
per slide, with shard lists like a real run's. Every row is measured in a fresh process (spawned), so the
memory column is that process' peak resident memory above what it held after its imports (for `status`,
which runs as a user runs it, the command's whole peak, interpreter and imports included).

Rows:
- discovery of the archive, local and S3; the ledger diff (what `run`/`watch` would do) on top;
- the ledger: reading its state, one commit (what each finished slide costs the driver), `compact`, the
  snapshot's size; the same state read from a JSON snapshot (the format before Parquet) as the baseline;
- `slidestream status` and `status --json` as a user runs them (a new interpreter, printing every slide);
- `watch` over the S3 prefix after 20 new slides arrive: its first poll (which reads the ledger) and the next
  one, which finds them ready (one watcher, as `slidestream watch` polls);
- with `--ray N,…`: `slidestream run`'s ingest over N tiny synthetic slides (hard links of one slide, each
  yielding a few tiles): the driver's peak memory and the wall time per slide, once per `--windows` setting
  (`ingest.window_slides`; 0 runs the whole archive as one Ray Data dataset, as before windows).

    python bench/scale.py [--sizes 1000,10000,100000] [--no-s3] [--ray 1000,10000] [--windows 2000,0]
                          [--plot scale.png]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slidestream.cluster.config import load_config
from slidestream.cluster.storage import filesystem, join
from slidestream.pipelines.embed import EmbedStage
from slidestream.pipelines.ingest import slides_to_do
from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.pipelines.ledger_format import encode_commit
from slidestream.pipelines.slides import SlideRef, discover_slides
from slidestream.pipelines.tile_store import tiles_stage

NEW_SLIDES = 20
LINKS_PER_FILE = 50_000
SETTINGS = ("ray.num_cpus=2", "ray.object_store_mb=512", "embed.input_px=32")


def config(*extra: str):
    return load_config(None, [*SETTINGS, *extra])


def embed_stage() -> EmbedStage:
    cfg = config()
    return EmbedStage("resnet18_trunc", "random", cfg.tiling, cfg.embed)


# -- measuring in a fresh process --------------------------------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measured(fn: Callable[..., dict[str, Any]], args: tuple) -> dict[str, Any]:
    """Runs in the child: `fn(*args)`'s own figures plus the peak memory it added (MB)."""
    base = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    result = fn(*args)
    result["peak_mb"] = (_rss_kb("VmHWM") - base) / 1024
    return result


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_measured, fn, args).result()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


# -- the archive -------------------------------------------------------------------------------------------


def slide_key(i: int) -> str:
    return f"site-{i % 23:02d}/{2012 + i % 12}/TCGA-{i % 97:02X}-{i:06d}-01Z-00-DX1.svs"


def slide_bytes(i: int) -> int:
    return 300_000_000 + (i * 7_919_123) % 2_700_000_000  # 0.3–3 GB, like diagnostic slides


def make_local_archive(root: Path, first: int, count: int) -> None:
    for i in range(first, first + count):
        path = root / slide_key(i)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(slide_bytes(i))  # sparse: the size is real, the disk use is not
        if i % 20 == 0:
            path.with_suffix(".xml").write_text("<annotations/>")


def make_s3_archive(prefix: str, first: int, count: int) -> None:
    fs, root = filesystem(prefix)
    objects: dict[str, bytes] = {}
    for i in range(first, first + count):
        objects[f"{root}/{slide_key(i)}"] = b"x"
        if i % 20 == 0:
            objects[f"{root}/{slide_key(i)[:-4]}.xml"] = b"<annotations/>"
    keys = list(objects)
    for start in range(0, len(keys), 5000):
        fs.pipe({k: objects[k] for k in keys[start : start + 5000]}, batch_size=64)


def ledger_entries(slides: list[SlideRef], stages: list[str]) -> list[LedgerEntry]:
    """A finished run's entries: every slide ok in every stage, with its shards."""
    entries = []
    for slide in slides:
        for stage in stages:
            digest = f"{zlib.crc32(f'{slide.slide_id}/{stage}'.encode()):08x}"
            entries.append(
                LedgerEntry(
                    stage=stage,
                    slide_id=slide.slide_id,
                    uri=slide.uri,
                    size=slide.size,
                    etag_or_mtime=slide.fingerprint,
                    status="ok",
                    n_tiles=4000 + len(slide.slide_id) * 37,
                    mpp=0.2527,
                    backend="tiffslide",
                    shards=[f"shard-{slide.slide_id}-{digest}-{k:04d}.tar" for k in range(3)]
                    if stage.startswith("tiles/")
                    else [f"part-{slide.slide_id}-{digest}.parquet"],
                    versions={"ingest": "3", "tiling": "2"},
                    extra={"width": 98_304, "height": 75_776, "level": 0, "nodes": ["a1b2c3"]},
                    committed_at=1.7e9,
                )
            )
    return entries


def write_ledger(out: str, entries: list[LedgerEntry]) -> None:
    """The ledger of a finished run: one snapshot (Parquet)."""
    ledger = Ledger(out)
    half = len(entries) // 2
    ledger.commit(entries[:half])
    ledger.commit(entries[half:])
    ledger.compact()


def write_json_ledger(out: str, entries: list[LedgerEntry]) -> None:
    """The same ledger as the JSON snapshot the previous format wrote (the baseline)."""
    fs, root = filesystem(join(out, "ledger"))
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{time.time_ns():020d}-snapshot-00000000.json", encode_commit(entries))


# -- the rows (each runs in a fresh process) -----------------------------------------------------------------


def row_discovery(source: str, out: str) -> dict[str, Any]:
    cfg, stages = config(), [tiles_stage(config().tiling), embed_stage().stage]
    seconds, found = timed(lambda: discover_slides(source, cfg.ingest.slide_extensions))
    read, state = timed(lambda: Ledger(out).state())
    diff, todo = timed(lambda: slides_to_do(found.slides, state, stages))
    return {
        "seconds": seconds,
        "slides": len(found.slides),
        "ledger_read": read,
        "diff": diff,
        "todo": len(todo),
    }


def row_ledger_read(out: str) -> dict[str, Any]:
    seconds, state = timed(lambda: Ledger(out).state())
    return {"seconds": seconds, "entries": len(state)}


def row_commit_and_compact(out: str) -> dict[str, Any]:
    """One commit by a fresh writer, 20 by the run's driver (state read), then `compact`."""
    ledger = Ledger(out)
    entry = next(iter(ledger.state().values()))
    fresh, _ = timed(lambda: Ledger(out).commit([entry]))
    driver = sorted(timed(lambda: ledger.commit([entry]))[0] for _ in range(20))
    compact, _ = timed(ledger.compact)
    return {"commit_fresh": fresh, "commit_median": driver[10], "commit_max": driver[-1], "compact": compact}


def row_status(out: str, as_json: bool) -> dict[str, Any]:
    cli = str(Path(sys.executable).with_name("slidestream"))  # the console script beside this interpreter
    command = [cli, "status", "--out", out, *(["--json"] if as_json else [])]
    seconds, done = timed(lambda: subprocess.run(command, capture_output=True, check=True))
    # the command's own peak (the only child): its whole resident memory, imports included
    child_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": seconds, "lines": done.stdout.count(b"\n"), "command_peak_mb": child_peak_mb}


def row_watch_poll(source: str, out: str, first_new: int) -> dict[str, Any]:
    from slidestream.pipelines.watch import Watcher

    watcher = Watcher(source, out, config(), embed_stage(), echo=lambda line: None)
    first, _ = timed(watcher.poll)  # the new slides are seen: they wait one poll to hold still
    waiting = watcher.status.waiting
    second, ready = timed(watcher.poll)
    names = sorted(s.slide_id for s in ready)
    expected = sorted(Path(slide_key(i)).stem for i in range(first_new, first_new + NEW_SLIDES))
    assert names == expected, f"the poll found {len(names)} slides ready, not the {NEW_SLIDES} new ones"
    return {"first": first, "seconds": second, "ready": len(ready), "waiting_first": waiting}


def row_ray_ingest(source: str, out: str, window: int) -> dict[str, Any]:
    from slidestream.cluster.runtime import ensure_ray
    from slidestream.pipelines.ingest import run_ingest

    cfg = config(f"ingest.window_slides={window}")
    ensure_ray(cfg.ray)
    seconds, report = timed(lambda: run_ingest(source, out, cfg))
    assert not report.failed, f"{len(report.failed)} slides failed: {next(iter(report.failed.items()))}"
    return {"seconds": seconds, "slides": len(report.ok), "tiles": report.tiles}


# -- driving -----------------------------------------------------------------------------------------------


def size_of(uri: str) -> int:
    fs, root = filesystem(uri)
    return sum(int(i["size"]) for i in fs.find(root, detail=True).values())


def measure_size(n: int, work: Path, s3: bool) -> dict[str, Any]:
    local, out_local, out_json = work / f"archive-{n}", str(work / f"out-{n}"), str(work / f"out-json-{n}")
    make_local_archive(local, 0, n)
    slides = discover_slides(str(local), config().ingest.slide_extensions).slides
    stages = [tiles_stage(config().tiling), embed_stage().stage]
    entries = ledger_entries(slides, stages)
    write_ledger(out_local, entries)
    write_json_ledger(out_json, entries)
    rows: dict[str, Any] = {"n": n}
    rows["discover local"] = in_fresh_process(row_discovery, str(local), out_local)
    rows["ledger read"] = in_fresh_process(row_ledger_read, out_local)
    rows["ledger read, JSON"] = in_fresh_process(row_ledger_read, out_json)
    rows["snapshot MB"] = size_of(join(out_local, "ledger")) / 1e6
    rows["snapshot MB, JSON"] = size_of(join(out_json, "ledger")) / 1e6
    rows["status"] = in_fresh_process(row_status, out_local, False)
    rows["status --json"] = in_fresh_process(row_status, out_local, True)
    rows["commit"] = in_fresh_process(row_commit_and_compact, out_local)
    if s3:
        prefix, out_s3 = f"s3://scale/archive-{n}", f"s3://scale/out-{n}"
        make_s3_archive(prefix, 0, n)
        s3_slides = discover_slides(prefix, config().ingest.slide_extensions).slides
        write_ledger(out_s3, ledger_entries(s3_slides, stages))
        rows["discover s3"] = in_fresh_process(row_discovery, prefix, out_s3)
        make_s3_archive(prefix, n, NEW_SLIDES)
        rows["watch poll s3"] = in_fresh_process(row_watch_poll, prefix, out_s3, n)
    shutil.rmtree(local)
    return rows


def measure_ray(n: int, work: Path, windows: list[int]) -> list[dict[str, Any]]:
    """One ingest run per window size (`ingest.window_slides`; 0 = the whole archive as one dataset, as before
    windows), each into a fresh output over the same slides."""
    from slidestream.pipelines.synthetic import SlideSpec, write_slide

    source = work / f"ray-{n}"
    source.mkdir()
    for i in range(n):
        template = source / f"s{i - i % LINKS_PER_FILE:06d}.svs"  # a file takes at most 65,000 links (ext4)
        if i % LINKS_PER_FILE == 0:
            write_slide(template, SlideSpec(2048, 1536, seed=3, n_pieces=1))
        else:
            os.link(template, source / f"s{i:06d}.svs")
    results = []
    for window in windows:
        out = work / f"ray-out-{n}-{window}"
        row = in_fresh_process(row_ray_ingest, str(source), str(out), window or n)
        results.append({"n": n, "window": window or n, "one_dataset": not window, **row})
        shutil.rmtree(out)
    shutil.rmtree(source)
    return results


def table(results: list[dict[str, Any]]) -> str:
    def cell(row: str, n_result: dict[str, Any], key: str = "seconds") -> str:
        value = n_result.get(row)
        if value is None:
            return "—"
        return (
            f"{value:.2f}"
            if isinstance(value, float)
            else f"{value[key]:.3f} s / {value.get('command_peak_mb', value['peak_mb']):.0f} MB"
        )

    rows = [  # (label, row, figure)
        ("discover local", "discover local", "seconds"),
        ("discover s3", "discover s3", "seconds"),
        ("ledger read", "ledger read", "seconds"),
        ("ledger read, JSON", "ledger read, JSON", "seconds"),
        ("snapshot MB", "snapshot MB", ""),
        ("snapshot MB, JSON", "snapshot MB, JSON", ""),
        ("status", "status", "seconds"),
        ("status --json", "status --json", "seconds"),
        ("watch: first poll (reads the ledger)", "watch poll s3", "first"),
        ("watch: the poll that finds 20 new slides ready", "watch poll s3", "seconds"),
    ]
    head = "| measure | " + " | ".join(f"{r['n']:,} slides" for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    for label, name, key in rows:
        lines.append(f"| {label} | " + " | ".join(cell(name, r, key) for r in results) + " |")
    for key in ("commit_fresh", "commit_median", "commit_max", "compact"):
        lines.append(f"| {key} | " + " | ".join(f"{r['commit'][key] * 1000:.1f} ms" for r in results) + " |")
    for name in ("discover local", "discover s3"):
        for key in ("ledger_read", "diff"):
            cells = [f"{r[name][key]:.3f} s" if name in r else "—" for r in results]
            lines.append(f"| {name}: {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], ray: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in results]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in (
        "discover local",
        "discover s3",
        "ledger read",
        "ledger read, JSON",
        "status",
        "watch poll s3",
    ):
        if all(name in r for r in results):
            axis.plot(ns, [r[name]["seconds"] for r in results], marker="o", label=name)
    axis.plot(ns, [r["commit"]["commit_median"] for r in results], marker="o", label="commit (median)")
    for one_dataset, label in ((False, "ingest run (Ray, windows)"), (True, "ingest run (Ray, one dataset)")):
        runs = [r for r in ray if r["one_dataset"] == one_dataset]
        if runs:
            axis.plot([r["n"] for r in runs], [r["seconds"] for r in runs], marker="s", label=label)
    axis.set(
        xscale="log", yscale="log", xlabel="slides", ylabel="seconds", title="slidestream at archive scale"
    )
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--ray", default="", help="slide counts for the ingest run, e.g. 1000,10000")
    parser.add_argument(
        "--windows",
        default="2000,0",
        help="ingest.window_slides for each ingest run (0 = one dataset for the whole archive)",
    )
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--plot", help="write a log-log plot of the seconds here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="slidestream-scale-"))
    server = None
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, work, True)
        if not args.no_s3:
            from slidestream.testing.s3server import start_s3_server, stop_s3_server

            server = start_s3_server()
            cleanup.callback(stop_s3_server, server)
            os.environ.update(server.env())
            server.make_bucket("scale")
        results = []
        for n in (int(x) for x in args.sizes.split(",") if x):
            print(f"measuring {n:,} slides …", flush=True)
            results.append(measure_size(n, work, server is not None))
        ray_rows = []
        for n in (int(x) for x in args.ray.split(",") if x):
            print(f"ingest run over {n:,} tiny slides …", flush=True)
            ray_rows += measure_ray(n, work, [int(w) for w in args.windows.split(",")])
        print(table(results))
        if ray_rows:
            columns = ("slides per dataset", "slides", "tiles", "seconds", "ms per slide", "driver peak MB")
            print("\n| ingest run | " + " | ".join(columns) + " |")
            print("|---|---|---|---|---|---|---|")
            for r in ray_rows:
                print(
                    f"| {r['n']:,} tiny slides | {r['window']:,} | {r['slides']} | {r['tiles']} "
                    f"| {r['seconds']:.1f} | {r['seconds'] / r['n'] * 1000:.1f} | {r['peak_mb']:.0f} |"
                )
        if args.plot:
            plot(results, ray_rows, args.plot)
            print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
