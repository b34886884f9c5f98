"""Watch load benchmark: N small synthetic slides arrive in bursts while `slidestream watch` runs.

The slides are written ahead of time into a pool (`--distinct` different slides; slide N is a copy of pool
slide N mod distinct under its own name, which keeps the set-up short on a slow machine), then copied into
the watched prefix in bursts (each file is copied under a temporary name and renamed, so its arrival is one
instant). Measured from outside the watcher: slides/minute, latency from arrival to the committed feature
bag (the ledger's `committed_at`), and the resident memory of the watcher's whole process tree (driver,
raylet, Ray workers) from the first arrival to the last commit: the peak and the floor in each quarter of
that period (flat = the last quarter is not above the first; the peak also holds transient processes, e.g.
a burst's encoder actor starting while the last one exits) and the processes whose memory changed most.

Baseline in the same run: one `slidestream run` over all N slides at once (no arrivals to wait for), with
the same settings; the ratio is watch throughput ÷ batch throughput.

    python bench/watch.py [--slides 200] [--burst 20] [--gap 5] [--size mini|tiny] [--no-baseline]

`mini` slides are 4096 × 3072 px at 0.25 µm/px (~48 tiles of 256 px at 0.5 µm/px); `tiny` is the
synthetic generator's 8192 × 6144. CPU only (no GPU on this machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from slidestream.cluster.config import load_config
from slidestream.pipelines.embed import EmbedStage
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.synthetic import SIZES, SlideSpec, write_slide

SETTINGS = (
    "tiling.tile_px=256",
    "embed.input_px=32",
    "ray.num_cpus=2",
    "ray.object_store_mb=512",
    "watch.status_every_s=1",
)
MINI = (4096, 3072)


class TreeMemory:
    """RSS of a process and its descendants by role (the driver, each kind of Ray process), sampled every
    `interval` seconds: (time, {role: bytes}) pairs."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.root, self.interval = psutil.Process(pid), interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _role(self, proc: psutil.Process) -> str:
        if proc.pid == self.root.pid:
            return "watch driver"
        args = proc.cmdline()
        if args and args[0].startswith("ray::"):
            return args[0].split()[0].removesuffix(".__init__")
        script = next((a for a in args[1:] if a.endswith(".py")), None)
        return os.path.basename(script) if script else proc.name()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            roles: dict[str, int] = {}
            with contextlib.suppress(psutil.Error):
                for proc in [self.root, *self.root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        role = self._role(proc)
                        roles[role] = roles.get(role, 0) + proc.memory_info().rss
            if roles:
                self.samples.append((time.time(), roles))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def write_pool(pool: Path, distinct: int, size: str) -> list[Path]:
    pool.mkdir(parents=True, exist_ok=True)
    width, height = MINI if size == "mini" else SIZES[size]
    paths = []
    for i in range(distinct):
        path = pool / f"p{i:04d}.svs"
        if not path.exists():
            write_slide(path, SlideSpec(width, height, positive=i % 2 == 1, seed=1000 + i))
        paths.append(path)
    return paths


def _command(*args: str) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "slidestream.cli",
        *args,
        "--encoder",
        "resnet18_trunc",
        "--weights",
        "random",
    ]
    for setting in SETTINGS:
        command += ["--set", setting]
    return command


def _committed(out: Path, stage: str) -> dict[str, float]:
    return {e.slide_id: e.committed_at for e in Ledger(str(out)).entries(stage) if e.status == "ok"}


def run_watch(
    pool: list[Path], n: int, work: Path, stage: str, burst: int, gap: float, interval: float
) -> dict:
    slides, out = work / "watched", work / "watch-out"
    slides.mkdir()
    status = work / "status.json"
    env = {**os.environ, "SLIDESTREAM_PROGRESS": "0"}
    command = _command("watch", "--slides", str(slides), "--out", str(out), "--interval", str(interval))
    with open(work / "watch.log", "wb") as log:
        proc = subprocess.Popen(
            [*command, "--json-status", str(status)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    memory = TreeMemory(proc.pid)
    arrivals: dict[str, float] = {}
    try:
        while not status.exists():  # the watcher is up (Ray started, lock taken)
            assert proc.poll() is None, (work / "watch.log").read_text()[-3000:]
            time.sleep(0.2)
        for start in range(0, n, burst):
            for i in range(start, min(start + burst, n)):
                name = f"s{i:04d}"
                shutil.copyfile(pool[i % len(pool)], slides / f".{name}.part")
                os.replace(slides / f".{name}.part", slides / f"{name}.svs")
                arrivals[name] = time.time()
            time.sleep(gap)
        while len(_committed(out, stage)) < n:
            assert proc.poll() is None, (work / "watch.log").read_text()[-3000:]
            time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
        memory.stop()
    committed = _committed(out, stage)
    latencies = np.array([committed[s] - arrivals[s] for s in arrivals])
    first, last = min(arrivals.values()), max(committed.values())
    final = json.loads(status.read_text())
    return {
        "seconds": last - first,
        "slides_per_min": 60 * n / (last - first),
        "p50": float(np.percentile(latencies, 50)),
        "p95": float(np.percentile(latencies, 95)),
        "memory": [(t, roles) for t, roles in memory.samples if first <= t <= last],  # arrivals → commits
        "status": final,
    }


def run_batch(pool: list[Path], n: int, work: Path) -> float:
    """Seconds for one `slidestream run` over all slides (the process's own start excluded as far as the
    log allows: measured from the first line it prints to its exit)."""
    slides = work / "batch-in"
    slides.mkdir()
    for i in range(n):
        shutil.copyfile(pool[i % len(pool)], slides / f"s{i:04d}.svs")
    env = {**os.environ, "SLIDESTREAM_PROGRESS": "0"}
    started = time.time()
    done = subprocess.run(
        _command("run", "--slides", str(slides), "--out", str(work / "batch-out")),
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return time.time() - started


def quarters(samples: list[tuple[float, dict[str, int]]]) -> tuple[list[float], list[float]]:
    """Peak and floor (MB) of the whole tree's RSS in each quarter of the sampled period: the peak holds
    transient processes (an encoder actor starting while the last one exits), the floor what stays."""
    totals = np.array([sum(roles.values()) for _, roles in samples]) / 2**20
    parts = [part for part in np.array_split(totals, 4) if len(part)]
    return [float(part.max()) for part in parts], [float(part.min()) for part in parts]


def role_growth(samples: list[tuple[float, dict[str, int]]], top: int = 4) -> list[tuple[str, float, float]]:
    """The roles whose median RSS (MB) changed most between the first and the last quarter."""
    parts = np.array_split(np.arange(len(samples)), 4)
    roles = {role for _, sample in samples for role in sample}

    def median(role: str, part: np.ndarray) -> float:
        return float(np.median([samples[i][1].get(role, 0) for i in part])) / 2**20

    changes = [(role, median(role, parts[0]), median(role, parts[-1])) for role in roles]
    return sorted(changes, key=lambda c: -abs(c[2] - c[1]))[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slides", type=int, default=200)
    parser.add_argument("--burst", type=int, default=20, help="slides per burst")
    parser.add_argument("--gap", type=float, default=5.0, help="seconds between bursts")
    parser.add_argument("--interval", type=float, default=1.0, help="watch poll interval")
    parser.add_argument("--distinct", type=int, default=10, help="different slides in the pool")
    parser.add_argument("--size", choices=["mini", "tiny"], default="mini")
    parser.add_argument("--pool", default=str(Path(tempfile.gettempdir()) / "slidestream-bench-watch-pool"))
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    config = load_config(None, list(SETTINGS))
    stage = EmbedStage("resnet18_trunc", "random", config.tiling, config.embed).stage
    t0 = time.time()
    pool = write_pool(Path(args.pool) / args.size, args.distinct, args.size)
    print(f"pool: {len(pool)} {args.size} slides ready in {time.time() - t0:.0f} s ({args.pool})", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        work = Path(tmp)
        result = run_watch(pool, args.slides, work, stage, args.burst, args.gap, args.interval)
        report(args, result)
        if not args.no_baseline:
            batch_rate = 60 * args.slides / run_batch(pool, args.slides, work)
            _row("baseline: one `run` over all, slides/minute", f"{batch_rate:.1f}")
            _row("ratio watch ÷ batch throughput", f"{result['slides_per_min'] / batch_rate:.2f}")


def _row(name: str, value: str) -> None:
    print(f"| {name:<44} | {value:>17} |", flush=True)


def report(args: argparse.Namespace, result: dict) -> None:
    """The watch rows of the table (printed before the baseline runs: it takes as long again)."""
    peaks, floors = quarters(result["memory"])
    print()
    print(f"watch: {args.slides} {args.size} slides in bursts of {args.burst} every {args.gap:g} s, "
          f"poll every {args.interval:g} s; resnet18_trunc (random), tile 256 px @ 0.5 µm/px, input 32 px; "
          f"CPU only ({os.cpu_count()} cores), load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"| {'measure':<44} | {'value':>17} |")
    print(f"|{'-' * 46}|{'-' * 19}|")
    slides = result["status"]["slides"]
    _row("slides/minute (first arrival → last commit)", f"{result['slides_per_min']:.1f}")
    _row("latency p50, arrival → committed (s)", f"{result['p50']:.1f}")
    _row("latency p95, arrival → committed (s)", f"{result['p95']:.1f}")
    _row("bursts processed by the watcher", str(result["status"]["bursts"]))
    _row("slides committed / failed", f"{slides['committed']} / {slides['failed']}")
    _row("peak RSS per quarter of the run (MB)", " / ".join(f"{p:.0f}" for p in peaks))
    _row("floor RSS per quarter of the run (MB)", " / ".join(f"{p:.0f}" for p in floors))
    if len(peaks) == 4:
        _row(
            "memory: last quarter ÷ first (peak, floor)",
            f"{peaks[-1] / peaks[0]:.2f}, {floors[-1] / floors[0]:.2f}",
        )
    for role, before, after in role_growth(result["memory"]):
        _row(f"  median RSS, {role[:30]} (MB)", f"{before:.0f} → {after:.0f}")


if __name__ == "__main__":
    main()
