"""MIL training at the small end: `--workers auto` (in-process folds on CPU) against one Ray Train worker per
fold, on the same ~100-bag cohort and fold plan, as a user runs them.

Each setting runs `slidestream train mil --folds K` in a new interpreter (Ray started and stopped by the
command, as a user sees it) into its own output, on one synthetic cohort of feature bags
(`slidestream.testing.bags.write_bags`: background instances, a few "witness" instances per positive bag).
`--repeats` rounds, the settings' order swapped every round so that load changes hit both alike. Printed:
wall seconds per run (median over rounds) and the ratio to `auto`; per fold, the test AUC and accuracy of
each setting and the largest difference between them (the same folds and seeds: the same result up to
floating-point reduction order).

    python bench/mil_workers.py [--slides 100] [--folds 10] [--epochs 20] [--dim 64] [--instances 50 200]
                                [--workers auto 1] [--repeats 2] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slidestream.testing.bags import write_bags


def train(work: Path, features: Path, labels: str, workers: str, args: argparse.Namespace, tag: str) -> Any:
    """One `slidestream train` run; returns its wall seconds and its per-fold metrics."""
    out = work / f"out-{tag}"
    cli = str(Path(sys.executable).with_name("slidestream"))  # the console script beside this interpreter
    command = [
        cli, "train", "mil", "--name", "bench", "--out", str(out), "--features", str(features),
        "--labels", labels, "--model", "abmil", "--folds", str(args.folds), "--epochs", str(args.epochs),
        "--workers", workers, "--set", "ray.num_cpus=2",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"workers={workers}: exit {done.returncode}\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "runs" / "bench" / "metrics.json").read_text())
    shutil.rmtree(out)
    return seconds, {(r["seed"], r["fold"]): r for r in metrics["folds"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slides", type=int, default=100)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--instances", type=int, nargs=2, default=(50, 200))
    parser.add_argument("--workers", nargs="+", default=["auto", "1"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", help="keep the cohort here (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="slidestream-mil-workers-"))
    labels = write_bags(str(work), n_slides=args.slides, dim=args.dim, n_instances=tuple(args.instances))
    seconds: dict[str, list[float]] = {w: [] for w in args.workers}
    folds: dict[str, dict] = {}
    for round_ in range(args.repeats):
        order = args.workers if round_ % 2 == 0 else args.workers[::-1]
        for workers in order:
            took, folds[workers] = train(
                work, work / "features", labels, workers, args, f"{workers}-{round_}"
            )
            seconds[workers].append(took)
            print(f"round {round_}: workers={workers}: {took:.1f} s", flush=True)
    base = statistics.median(seconds[args.workers[0]])
    print(f"\n{args.slides} bags, {args.folds} folds, {args.epochs} epochs max, ABMIL, ray.num_cpus=2")
    print("| workers | seconds (median) | runs | × " + args.workers[0] + " |\n|---|---|---|---|")
    for workers, runs in seconds.items():
        median = statistics.median(runs)
        print(f"| {workers} | {median:.1f} | {', '.join(f'{s:.1f}' for s in runs)} | {median / base:.2f} |")
    keys = sorted(folds[args.workers[0]])
    print("\n| seed, fold | " + " | ".join(f"AUC / acc ({w})" for w in args.workers) + " | max ΔAUC |")
    print("|---" * (len(args.workers) + 2) + "|")
    for key in keys:
        rows = [folds[w][key] for w in args.workers]
        cells = " | ".join(f"{r['auc']:.4f} / {r['acc']:.3f}" for r in rows)
        spread = max(r["auc"] for r in rows) - min(r["auc"] for r in rows)
        print(f"| {key[0]}, {key[1]} | {cells} | {spread:.4f} |")
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
