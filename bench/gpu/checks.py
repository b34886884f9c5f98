"""Run every GPU check, each in its own process under its own time limit, so that one failure or hang is
recorded and the others still run; write `gpu-results.json` and `gpu-results.md` to `--out`.

`--cpu` runs the same checks at tiny sizes on the CPU: the rehearsal that keeps the kit working between
the rare minutes on a GPU machine. The checks (see each script's docstring):
  1 ceiling   encoder alone, bf16, channels-last, batch sweep, ± torch.compile     bench/gpu/ceiling.py
  2 jpeg      PIL on all cores vs torchvision.io.decode_jpeg on the GPU             bench/gpu/jpeg.py
  3+4 stream  `slidestream run` from slides, then `embed` from its shards           bench/gpu/stream.py
  5 mil       MIL/MHIM steps, ABMIL + TransMIL at 10 000 × 1024; Ray Train, 1 GPU   bench/mil.py
  6 icmil     embedder fine-tuning through Ray Train + the bf16 distillation step   bench/icmil.py
  6 cdma      MTNet (official ResNet-50) training patches/s, slide inference        bench/cdma.py
  7 gigassl   Giga-SSL step, 256 slides × 2 views × T=5, spconv's CUDA build        bench/gigassl.py

    python bench/gpu/checks.py --out DIR [--cpu] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TAIL_LINES = 40
MIN_CHECK_S = 20  # a check is not started with less of the budget left
PACKAGES = ("ray", "timm", "torchvision", "spconv-cu126", "spconv", "cumm-cu126", "pydantic", "webdataset",
            "tiffslide", "imagecodecs")  # fmt: skip


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    script: str  # relative to the repository root
    gpu_args: str  # split on spaces
    cpu_args: str
    gpu_limit_s: int
    cpu_limit_s: int
    writes_json: bool = False


CHECKS = (
    Check(
        "ceiling", "1. encoder alone, bf16, batch sweep ± torch.compile", "bench/gpu/ceiling.py",
        "--encoders resnet50_trunc timm:vit_large_patch16_224 --batches 64 128 256 512 1024 --tiles 4096",
        "--encoders resnet18_trunc --batches 8 16 --tiles 32 --input-px 64",
        150, 300, writes_json=True,
    ),
    Check(
        "jpeg", "2. JPEG decode: PIL on all cores vs nvJPEG (torchvision) on the GPU", "bench/gpu/jpeg.py",
        "--tiles 20000 --batch 256", "--tiles 400 --batch 32", 60, 120, writes_json=True,
    ),
    Check(
        "stream", "3+4. `run` from slides and `embed` from shards, one GPU actor", "bench/gpu/stream.py",
        "--slides 16 --copies 4 --size small --encoder resnet50_trunc --set ray.object_store_mb=16384 "
        "--set ray.data_memory_mb=8192",
        "--slides 2 --copies 2 --size tiny --encoder resnet18_trunc --batch 16 --input-px 64",
        240, 420, writes_json=True,
    ),
    Check(
        "mil", "5. MIL/MHIM steps (ABMIL, TransMIL; 10 000 × 1024-d), Ray Train on 1 GPU", "bench/mil.py",
        "--device cuda --bags 10 --transmil-bags 10 --repeats 1 --workers 1 --epochs 3 --train-bags 24",
        "--quick --workers 1", 120, 300,
    ),
    Check(
        "icmil", "6. ICMIL fine-tuning (Ray Train), bf16 distillation step", "bench/icmil.py",
        "--slides 3 --encoder resnet50_trunc --input-px 224 --batch 128 --tiles-per-epoch 2048 --epochs 2 "
        "--workers 1 --gpu-batch 128",
        "--slides 2 --tiles-per-epoch 64 --batch 16 --epochs 2 --workers 1", 100, 300,
    ),
    Check(
        "cdma", "6. CDMA: official MTNet (ResNet-50) training patches/s, slide inference", "bench/cdma.py",
        "--work /tmp/slidestream-gpu-cdma --slides 6 --network official --steps 8 --batch 32 "
        "--infer-batch 64 "
        "--worker-counts 1",
        "--work /tmp/slidestream-gpu-cdma-cpu --slides 4 --steps 2 --batch 4 --worker-counts 1", 100, 300,
    ),
    Check(
        "gigassl", "7. Giga-SSL step (256 slides × 2 views × T=5), spconv", "bench/gigassl.py",
        "--slides 256 --nt 5 --epochs 4 --workers 1",
        "--slides 16 --nt 5 --epochs 2 --workers 1 --grid 16", 90, 300,
    ),
)  # fmt: skip


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "cpu_cores": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "packages": {p: _version(p) for p in PACKAGES},
    }
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        env["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        env["nvidia_smi"] = None
    # A borrowed machine gets the working tree, not necessarily its history: the caller names the commit.
    env["commit"] = (
        os.environ.get("SLIDESTREAM_COMMIT")
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    )
    return env


def extra_args(check: Check, done: dict[str, dict[str, Any]]) -> list[str]:
    """The stream check runs at the encoder's best batch from check 1 and is measured against it."""
    ceiling = (done.get("ceiling") or {}).get("result")
    if check.name != "stream" or not ceiling:
        return []
    encoder = ceiling["encoders"][0]
    batch = encoder["best_batch"]
    return ["--batch", str(batch), "--ceiling", str(encoder["tiles_per_s"][str(batch)])]


def run_check(
    check: Check, out: Path, cpu: bool, done: dict[str, dict[str, Any]], budget_s: float
) -> dict[str, Any]:
    log = out / "logs" / f"{check.name}.log"
    result_file = out / "logs" / f"{check.name}.json"
    argv = [sys.executable, str(ROOT / check.script), *(check.cpu_args if cpu else check.gpu_args).split()]
    argv += extra_args(check, done)
    if check.writes_json:
        argv += ["--json", str(result_file)]
    limit = int(min(check.cpu_limit_s if cpu else check.gpu_limit_s, budget_s))
    print(f"== {check.title} (limit {limit} s)", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(
                argv, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=limit
            ).returncode
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {limit} s"
    lines = log.read_text(errors="replace").splitlines()
    entry: dict[str, Any] = {
        "name": check.name,
        "title": check.title,
        "status": status,
        "seconds": round(time.perf_counter() - started, 1),
        "command": " ".join(argv[1:]).replace(str(ROOT) + "/", ""),
        "tail": lines[-TAIL_LINES:],
    }
    if result_file.exists():
        entry["result"] = json.loads(result_file.read_text())
    print(f"   {status} in {entry['seconds']} s", flush=True)
    if status != "ok":
        print("\n".join("   | " + line for line in lines[-15:]), flush=True)
    return entry


def markdown(env: dict[str, Any], entries: list[dict[str, Any]]) -> str:
    out = [f"# GPU checks on {env['device']} ({env.get('nvidia_smi') or 'no nvidia-smi'})", "",
           f"commit {env['commit']}, torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), "
           f"Python {env['python']}, {env['cpu_cores']} cores; "
           + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v), "",
           "| check | status | seconds |", "|---|---|---|"]  # fmt: skip
    out += [f"| {e['title']} | {e['status']} | {e['seconds']} |" for e in entries]
    for e in entries:
        out += ["", f"## {e['title']}", "", f"`{e['command']}`", ""]
        if "result" in e:
            out += ["```json", json.dumps(e["result"], indent=1), "```"]
        else:
            out += ["```", *e["tail"], "```"]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--cpu", action="store_true", help="rehearse at tiny sizes on the CPU")
    parser.add_argument("--only", nargs="+", choices=[c.name for c in CHECKS], default=None)
    parser.add_argument(
        "--budget-s", type=float, default=470.0, help="all checks together (GPU); a check gets what is left"
    )
    args = parser.parse_args()
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = environment()
    print(json.dumps(env, indent=1), flush=True)
    if not args.cpu and env["device"] == "cpu":
        parser.error("no CUDA device here; use --cpu to rehearse")
    done: dict[str, dict[str, Any]] = {}
    entries = []
    deadline = time.perf_counter() + (float("inf") if args.cpu else args.budget_s)
    for check in CHECKS:
        if args.only and check.name not in args.only:
            continue
        left = deadline - time.perf_counter()
        if left < MIN_CHECK_S:
            entry = {"name": check.name, "title": check.title, "status": "not run (time budget spent)"}
            done[check.name] = {**entry, "seconds": 0.0, "command": "", "tail": []}
        else:
            done[check.name] = run_check(check, out, args.cpu, done, left)
        entries.append(done[check.name])
        (out / "gpu-results.json").write_text(json.dumps({"environment": env, "checks": entries}, indent=1))
        (out / "gpu-results.md").write_text(markdown(env, entries))
    failed = [e["name"] for e in entries if e["status"] != "ok"]
    print(
        f"\n{len(entries) - len(failed)} ok, {len(failed)} not ok{': ' + ', '.join(failed) if failed else ''}"
    )
    pack_logs(out / "logs")
    print(f"results: {out / 'gpu-results.md'}, logs in {out / 'logs.tar.gz'}")


def pack_logs(logs: Path) -> None:
    """The logs as one archive: few files to carry back from a borrowed machine."""
    with tarfile.open(logs.parent / "logs.tar.gz", "w:gz") as archive:
        archive.add(logs, arcname="logs")
    shutil.rmtree(logs)


if __name__ == "__main__":
    main()
