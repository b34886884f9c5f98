"""MIL training benchmark: MHIM-MIL against plain MIL per training step, and 1 vs 2 Ray Train workers.

Two measurements, one run:
1. Seconds per training step and peak memory, baseline vs MHIM, for ABMIL and TransMIL on bags of random
   features (default 10 bags × 10 000 instances × 1024-d), through the trainer's own code: baseline =
   `model.loss(model(x), y)`, MHIM = `MHIMStep.loss` (EMA teacher on the full bag, masking, student on the
   kept instances, CE + α·consistency) and `MHIMStep.after_step` (EMA), with the paper's presets as the
   trainer resolves them (`resolve_mhim`: C16-ABMIL for ABMIL, C16-TransMIL for TransMIL); Adam with the
   trainer's defaults, autocast as in the trainer. A step = forward + backward + optimizer step (+ EMA).
   On CPU torch runs one thread by default (`--threads`), as in the trainer's Ray workers with
   cpus_per_worker=1; with two threads on a shared 2-core machine every op can wait at a barrier for a
   descheduled thread, and steps became 10–100× slower and erratic.
   Each configuration runs in a fresh process, as the trainer runs a baseline or an MHIM fold (in one
   process with both, allocator effects moved the ABMIL ratio by ~0.1): a small throwaway step, the bags,
   `--warmup` untimed steps, then one timed pass over the bags. `--repeats` rounds, baseline and MHIM one
   after the other in each (order swapped every round) so that load changes hit both alike; s/step = the
   median over the rounds of a pass's mean; the ratio = the median of the rounds' MHIM / baseline ratios.
   TransMIL uses only the first `--transmil-bags` bags (a step takes ~6 s on one CPU core). Peak memory:
   the growth above the process's state once the bags are in memory (model, optimizer state, MHIM teacher
   and the steps' activations count): peak RSS (VmHWM, reset after setup; else ru_maxrss) on CPU,
   `torch.cuda.max_memory_allocated` on CUDA; median over the rounds.
   Targets (the paper's TransMIL ratios; ABMIL's overhead kept small): MHIM / baseline step time ≤ 1.15
   for ABMIL and < 1 for TransMIL, and MHIM / baseline peak memory < 1 for TransMIL (shorter sequences).
2. Epoch time of the real trainer (`fit_job`, Ray Train, gloo on CPU) with 1 vs 2 workers, ABMIL, on
   synthetic feature bags written to disk (`train.cpus_per_worker=1`: Ray gives each worker one torch
   thread). Epoch time = the trainer's own `epoch_s` from the fold's history (training steps + validation),
   median over epochs 2+ (the first is shown apart: first bag reads, warm-up); also the gaps between the
   per-epoch checkpoints (their names carry the time they were reported), which add the report and the
   checkpoint. Ray and Ray Train start-up and the final evaluation are left out of both.

    python bench/mil.py [--quick] [--device auto|cpu|cuda] [--instances 10000] [--dim 1024] [--bags 10]
                        [--transmil-bags 2] [--repeats 3] [--threads N] [--train-bags 24]
                        [--train-instances 2000 3000] [--epochs 4] [--no-steps] [--no-ray]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import multiprocessing
import os
import re
import resource
import shutil
import statistics
import tempfile
import threading
import time
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from slidestream.cluster.config import TrainConfig, load_config
from slidestream.cluster.storage import join, read_bytes
from slidestream.trainers.mil.loop import MHIMStep
from slidestream.trainers.models import build_model
from slidestream.trainers.session import RESULT_FILE, bf16_autocast

MODELS = ("abmil", "transmil")
MODES = ("baseline", "mhim")


# -- 1. per-step time and peak memory (one configuration per fresh process) ---------------------------------


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(reset: bool) -> int:
    """Peak RSS since the reset (VmHWM), or over the process's life (ru_maxrss) when it could not be reset."""
    if reset:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_bags(instances: int, dim: int, bags: int, device: torch.device, seed: int):
    data = torch.Generator().manual_seed(seed)
    xs = [torch.randn(instances, dim, generator=data).to(device) for _ in range(bags)]
    ys = [torch.tensor([i % 2], device=device) for i in range(bags)]
    return xs, ys


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRunner:
    """One training configuration, stepping as the trainer's loop does (`trainers/mil/loop.py`, `train_fold`):
    model and Adam with the trainer's defaults; with `mhim` parameters (from `resolve_mhim`, in the
    parent process: the children need not import Ray) through `MHIMStep`, its teacher seeded from another
    random model, standing in for the baseline weights the trainer would load."""

    def __init__(
        self,
        model_name: str,
        mhim: dict[str, Any] | None,
        dim: int,
        device: torch.device,
        total_steps: int,
        seed: int,
    ):
        train = TrainConfig(model=model_name)
        self.device = device
        torch.manual_seed(seed)
        self.model = build_model(model_name, dim, 2).to(device)
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=train.lr, weight_decay=train.weight_decay
        )
        self.mhim: MHIMStep | None = None
        self.params: dict[str, Any] = mhim or {}
        self.total_steps = total_steps
        if mhim is not None:
            torch.manual_seed(seed + 1)
            teacher_state = build_model(model_name, dim, 2).state_dict()
            self.mhim = MHIMStep(self.model, self.params, teacher_state, total_steps)
            self.mhim.teacher.to(device)
        self.gen = torch.Generator().manual_seed(seed)  # mask draws, as the trainer's (a CPU generator)
        self.model.train()

    def step(self, x: torch.Tensor, y: torch.Tensor, i: int) -> None:
        mhim, model = self.mhim, self.model
        with bf16_autocast(self.device):
            loss = mhim.loss(model, x, y, i, self.gen) if mhim else model.loss(model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if mhim:
            mhim.after_step(model, i)
        float(loss.detach())  # the trainer records every step's loss (a device sync on CUDA)

    def kept(self, x: torch.Tensor) -> int:
        """Instances the student sees for bag `x` (at the schedule's last step)."""
        if self.mhim is None:
            return x.shape[0]
        from slidestream.trainers.mil.mhim import mask_instances

        p = self.params
        with torch.no_grad(), bf16_autocast(self.device):
            scores = self.mhim.teacher(x)["scores"]
        ratio_h = self.mhim.high_ratio(self.total_steps - 1)
        return int(
            mask_instances(
                scores, mask_ratio=p["mask_ratio"], mask_ratio_l=p["mask_ratio_l"], mask_ratio_h=ratio_h,
                mask_ratio_hr=p["mask_ratio_hr"], generator=self.gen,
            ).numel()
        )  # fmt: skip


def measure(
    model_name: str,
    mhim: dict[str, Any] | None,
    instances: int,
    dim: int,
    bags: int,
    warmup: int,
    device_name: str,
    threads: int | None,
) -> dict[str, Any]:
    """One configuration in a process of its own (as the trainer runs a baseline or an MHIM fold): the
    seconds of each step of one pass over the bags after `warmup` untimed steps, and the peak memory growth.

    The bags are made first (on the device); everything after that counts towards the peak: model,
    optimizer state, MHIM teacher, activations of every step (warm-up included).
    """
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    xs, ys = _make_bags(instances, dim, bags, device, seed=0)
    # One small throwaway step first: module imports, kernel libraries, thread pools and the autograd
    # engine start lazily and cost the same in every configuration; keep them out of the peak.
    scratch = build_model(model_name, dim, 2).to(device)
    with bf16_autocast(device):
        scratch.loss(scratch(xs[0][:64]), ys[0]).backward()
    torch.optim.Adam(scratch.parameters()).step()
    del scratch
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        reset = False
    else:
        reset = _reset_peak_rss()
        base = _rss_bytes() if reset else _peak_rss_bytes(False)

    runner = StepRunner(model_name, mhim, dim, device, warmup + bags, seed=0)
    for i in range(warmup):
        runner.step(xs[i % bags], ys[i % bags], i)
    times = []
    for b in range(bags):
        _sync(device)
        started = time.perf_counter()
        runner.step(xs[b], ys[b], warmup + b)
        _sync(device)
        times.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _peak_rss_bytes(reset) - base
    return {
        "times": times,
        "peak": peak,
        "kept": runner.kept(xs[0]),
        "threads": torch.get_num_threads(),
        "memory_kind": "cuda allocated" if device.type == "cuda" else ("VmHWM" if reset else "ru_maxrss"),
    }


def _child(function: str, spec: dict[str, Any], conn) -> None:
    try:
        conn.send(globals()[function](**spec))
    except BaseException:  # report the failure to the parent instead of dying silently
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def run_isolated(function: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`function(**spec)` (a function of this module) in a freshly spawned process."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(function, spec, send))
    proc.start()
    send.close()
    try:
        result = receive.recv()
    except EOFError:
        proc.join()
        result = {"error": f"the measuring process died (exit code {proc.exitcode})"}
    proc.join()
    if "error" in result:
        raise RuntimeError(f"{function} {spec}: {result['error']}")
    return result


def step_benchmark(args: argparse.Namespace, device: str) -> dict[tuple[str, str], dict[str, Any]]:
    """`--repeats` rounds; each round runs baseline and MHIM once each, in fresh processes, one after the
    other (the order swapped every round), so that a change in the machine's load hits both alike."""
    from slidestream.trainers.mil.runner import resolve_mhim

    results: dict[tuple[str, str], dict[str, Any]] = {}
    common = {"instances": args.instances, "dim": args.dim, "device_name": device, "threads": args.threads}
    for model_name in MODELS:
        bags = args.bags if model_name == "abmil" else min(args.bags, args.transmil_bags)
        params = {"baseline": None, "mhim": resolve_mhim(TrainConfig(model=model_name))}  # paper preset
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for r in range(args.repeats):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                print(f"{model_name} {mode}, round {r + 1}/{args.repeats} ({bags} bags) …", flush=True)
                spec = {"model_name": model_name, "mhim": params[mode], "bags": bags, "warmup": args.warmup}
                runs[mode].append(run_isolated("measure", {**spec, **common}))
        means = {mode: [statistics.fmean(run["times"]) for run in runs[mode]] for mode in MODES}
        for mode in MODES:
            results[model_name, mode] = {
                "preset": (params[mode] or {}).get("preset", "-"),
                "bags": bags,
                "means": means[mode],
                "seconds": statistics.median(means[mode]),
                "peak": statistics.median(run["peak"] for run in runs[mode]),
                "peaks": [run["peak"] for run in runs[mode]],
                "kept": runs[mode][0]["kept"],
                "threads": runs[mode][0]["threads"],
                "memory_kind": runs[mode][0]["memory_kind"],
            }
        results[model_name, "mhim"]["paired"] = statistics.median(
            m / b for m, b in zip(means["mhim"], means["baseline"], strict=True)
        )
    return results


def print_steps(
    results: dict[tuple[str, str], dict[str, Any]], args: argparse.Namespace, device: str
) -> None:
    first = next(iter(results.values()))
    where = (
        "CUDA " + torch.cuda.get_device_name(0) if device == "cuda" else f"CPU, {first['threads']} threads"
    )
    print(
        f"\nper-step time and peak memory, bags of {args.instances} instances × {args.dim}-d, {where}. "
        f"{args.repeats} rounds, each a fresh process per configuration: {args.warmup} warm-up step(s), then "
        f"one pass over the bags (mean s/step); s/step = median over the rounds. Peak memory: "
        f"{first['memory_kind']} growth above the loaded bags, median over the rounds."
    )
    print(
        "| model    | run      | preset       | kept/bag | bags | s/step | per round (s/step)     | peak MB |"
    )
    print(
        "|----------|----------|--------------|----------|------|--------|------------------------|---------|"
    )
    for (model_name, mode), r in results.items():
        rounds = ", ".join(f"{m:.3f}" for m in r["means"])
        print(
            f"| {model_name:<8} | {mode:<8} | {r['preset']:<12} | {r['kept']:>8} | {r['bags']:>4} "
            f"| {r['seconds']:>6.3f} | {rounds:<22} | {r['peak'] / 2**20:>7.0f} |"
        )
    print()

    def verdict(label: str, ratio: float, target: float, strict: bool, extra: str = "") -> None:
        met = ratio < target if strict else ratio <= target
        op = "<" if strict else "≤"
        print(f"{label}: {ratio:.2f}{extra}  (target {op} {target:.2f}: {'met' if met else 'NOT met'})")

    for model_name, target, strict in (("abmil", 1.15, False), ("transmil", 1.0, True)):
        base, mhim = results[model_name, "baseline"], results[model_name, "mhim"]
        verdict(
            f"{model_name} step time, MHIM / baseline (median of the rounds' ratios)",
            mhim["paired"], target, strict, f"; ratio of medians {mhim['seconds'] / base['seconds']:.2f}",
        )  # fmt: skip
    for model_name in MODELS:
        ratio = results[model_name, "mhim"]["peak"] / max(1, results[model_name, "baseline"]["peak"])
        if model_name == "transmil":
            verdict("transmil peak memory, MHIM / baseline", ratio, 1.0, True)
        else:
            print(f"{model_name} peak memory, MHIM / baseline: {ratio:.2f}")


# -- 2. 1 vs 2 Ray Train workers ----------------------------------------------------------------------------

_CKPT = re.compile(r"^checkpoint_(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d\.\d+)$")


class CheckpointClock(threading.Thread):
    """Watches a Ray Train run directory and records when each per-epoch checkpoint was reported (from the
    name Ray gives it, else when it was first seen). Old checkpoints are deleted (num_to_keep), hence the
    polling."""

    def __init__(self, directory: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.directory, self.interval = directory, interval
        self.seen: dict[str, float] = {}
        self._done = threading.Event()

    def _poll(self) -> None:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name in self.seen or not (match := _CKPT.match(name)):
                continue
            try:
                stamp = datetime.strptime(match.group(1), "%Y-%m-%d_%H-%M-%S.%f").timestamp()
            except ValueError:
                stamp = time.time()
            self.seen[name] = stamp

    def run(self) -> None:
        while not self._done.is_set():
            self._poll()
            time.sleep(self.interval)
        self._poll()

    def stop(self) -> list[float]:
        self._done.set()
        self.join()
        return sorted(self.seen.values())


def write_training_bags(root: Path, n: int, dim: int, instances: tuple[int, int]) -> tuple[str, str, int]:
    """Synthetic bags on disk with a labels file whose split column holds 4 val and 4 test bags (2 of each
    class), the rest training bags; returns (features, labels, training bag count)."""
    from slidestream.testing.bags import write_bags

    labels = write_bags(str(root), n_slides=n, dim=dim, n_instances=instances, seed=0)
    lines = Path(labels).read_text().splitlines()
    rows = [lines[0] + ",split"]
    for i, line in enumerate(lines[1:]):
        rows.append(f"{line},{'test' if i < 4 else 'val' if i < 8 else 'train'}")
    Path(labels).write_text("\n".join(rows) + "\n")
    return str(root / "features"), labels, n - 8


def ray_benchmark(args: argparse.Namespace, device: str, work: Path) -> list[dict[str, Any]]:
    from slidestream.cluster.runtime import ensure_ray
    from slidestream.trainers.mil.runner import Run, fit_job

    print(f"writing {args.train_bags} bags for the Ray Train runs …", flush=True)
    features, labels, n_train = write_training_bags(
        work / "bags", args.train_bags, args.dim, tuple(args.train_instances)
    )
    rows = []
    for workers in args.workers:
        # one GPU per rank (NCCL refuses two ranks on one device): on CPU when there are too few
        gpus = 1 if device == "cuda" and torch.cuda.device_count() >= workers else 0
        config = load_config(
            None,
            [
                "ray.object_store_mb=512",
                "train.model=abmil",
                f"train.workers={workers}",
                "train.cpus_per_worker=1",
                f"train.gpus_per_worker={gpus}",
                f"train.epochs={args.epochs}",
                f"train.min_epochs={args.epochs}",
                "train.max_failures=0",
            ],
        )
        ensure_ray(config.ray)
        run = Run("mil", f"workers{workers}", str(work / "out"), features, labels, config)
        job = run.jobs()[0]
        storage = Path(run.run_dir) / "ray"
        print(f"fit_job with {workers} worker(s), {args.epochs} epochs …", flush=True)
        clock = CheckpointClock(storage / job.name)
        clock.start()
        started = time.perf_counter()
        try:
            fit_job(job, config.train, str(storage))
        finally:
            stamps = clock.stop()
        total = time.perf_counter() - started
        intervals = [b - a for a, b in itertools.pairwise(stamps)]
        history = json.loads(read_bytes(join(job.result_dir, RESULT_FILE)))["history"]
        # The trainer's own per-epoch time (training + validation); older trainers lack it.
        epoch_s = [h["epoch_s"] for h in history if "epoch_s" in h]
        if not intervals and len(epoch_s) < 2:
            raise RuntimeError(
                f"{workers} worker(s): no epoch after the first was timed ({storage / job.name})"
            )
        rows.append(
            {"workers": workers, "epoch_s": epoch_s, "intervals": intervals, "total": total,
             "steps": -(-len(job.train_ids) // workers), "n_train": n_train, "gpus": gpus}
        )  # fmt: skip
    return rows


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_ray(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    lo, hi = args.train_instances
    where = "1 GPU each, NCCL" if rows[0]["gpus"] else "CPU, 1 core and 1 torch thread each, gloo"
    print(
        f"\nRay Train (`fit_job`), ABMIL baseline, {rows[0]['n_train']} training bags (+4 val, 4 test) of "
        f"{lo}–{hi} instances × {args.dim}-d, {args.epochs} epochs; workers: {where}. 'epoch': the trainer's "
        "epoch_s (train steps + validation), median of epochs 2+ (epoch 1 apart: first reads, warm-up); "
        "'ckpt gap': time between per-epoch checkpoints (adds the report and checkpoint)"
    )
    print("| workers | steps/worker | epoch 1 s | epoch s | epochs 2+ (s)        | ckpt gap s | total s |")
    print("|---------|--------------|-----------|---------|----------------------|------------|---------|")
    for r in rows:
        first = r["epoch_s"][0] if r["epoch_s"] else float("nan")
        later = ", ".join(f"{e:.2f}" for e in r["epoch_s"][1:])
        print(
            f"| {r['workers']:>7} | {r['steps']:>12} | {first:>9.2f} | {_median(r['epoch_s'][1:]):>7.2f} "
            f"| {later:<20} | {_median(r['intervals']):>10.2f} | {r['total']:>7.1f} |"
        )
    if [r["workers"] for r in rows] == [1, 2]:
        for label, key in (("epoch", "epoch_s"), ("checkpoint gap", "intervals")):
            one, two = (_median(r[key][1:] if key == "epoch_s" else r[key]) for r in rows)
            print(f"\n{label} time, 2 workers / 1 worker: {two / one:.2f}  (ideal 0.50)", end="")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--instances", type=int, default=10_000, help="instances per bag (step timing)")
    parser.add_argument("--dim", type=int, default=1024, help="feature dimension")
    parser.add_argument("--bags", type=int, default=10, help="bags per pass (step timing)")
    parser.add_argument(
        "--transmil-bags", type=int, default=2, help="at most this many bags for TransMIL (slow on CPU)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds (a process per configuration each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, per process")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for the step timing; default 1 on CPU, as in the trainer's Ray workers with "
        "cpus_per_worker=1 (and steady on a shared machine); 0: torch's default",
    )
    parser.add_argument("--train-bags", type=int, default=24, help="bags for the Ray Train runs (≥ 10)")
    parser.add_argument("--train-instances", type=int, nargs=2, default=[2000, 3000], metavar=("MIN", "MAX"))
    parser.add_argument("--epochs", type=int, default=4, help="epochs per Ray Train run (≥ 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray Train worker counts")
    parser.add_argument("--no-steps", action="store_true", help="skip the per-step measurement")
    parser.add_argument("--no-ray", action="store_true", help="skip the 1 vs 2 workers measurement")
    parser.add_argument("--quick", action="store_true", help="small smoke configuration (< 1 minute)")
    args = parser.parse_args()
    if args.quick:
        args.instances, args.dim, args.bags, args.repeats, args.warmup = 1000, 128, 2, 1, 1
        args.transmil_bags = 1
        args.train_bags, args.train_instances, args.epochs = 10, [100, 200], 2
    if args.train_bags < 10 or args.epochs < 2:
        parser.error("--train-bags must be ≥ 10 and --epochs ≥ 2")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads is None:
        args.threads = 1 if device == "cpu" else 0

    started, load = time.perf_counter(), os.getloadavg()[0]
    steps = None if args.no_steps else step_benchmark(args, device)
    rows = None
    if not args.no_ray:
        work = Path(tempfile.mkdtemp(prefix="bench-mil-"))
        try:
            rows = ray_benchmark(args, device, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if steps:
        print_steps(steps, args, device)
    if rows:
        print_ray(rows, args)
    print(
        f"\n(benchmark took {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores; 1-minute load "
        f"average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)"
    )


if __name__ == "__main__":
    main()
