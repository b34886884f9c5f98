"""Runs on the cluster, in front of a submitted command: ask the autoscaler for GPUs/CPUs and wait for them.

Stages use a GPU only when the cluster has one when they start (`embed.actor_gpus`,
`train.gpus_per_worker`), so on an autoscaling cluster whose GPU workers scale from 0 someone must ask
for them first: `slidestream submit --gpus N -- …` runs the command through this module, which requests
N one-GPU bundles (`ray.autoscaler.sdk.request_resources`), waits until the GPU nodes have joined, runs
the command, and then withdraws the request so that idle GPU nodes scale down again.

    python -m slidestream.job_entry --gpus 1 [--cpus 32] [--wait-s 900] -- python -m slidestream.cli run …
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence

EXIT_NO_NODES = 4  # the requested resources did not join in time


def _log(message: str) -> None:
    print(f"slidestream job: {message}", flush=True)


def wait_for(gpus: int, cpus: int, wait_s: float) -> bool:
    import ray

    deadline = time.monotonic() + wait_s
    last = 0.0
    while True:
        have = ray.cluster_resources()
        if have.get("GPU", 0) >= gpus and have.get("CPU", 0) >= cpus:
            _log(f"cluster has {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs")
            return True
        if time.monotonic() > deadline:
            return False
        if time.monotonic() - last > 30:
            _log(
                f"waiting for the autoscaler: {have.get('CPU', 0):g}/{cpus} CPUs, "
                f"{have.get('GPU', 0):g}/{gpus} GPUs"
            )
            last = time.monotonic()
        time.sleep(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slidestream.job_entry", description=__doc__)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs (one-GPU bundles) to have before starting")
    parser.add_argument("--cpus", type=int, default=0, help="CPUs to have before starting")
    parser.add_argument("--wait-s", type=float, default=900, help="give up after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(log_to_driver=False, configure_logging=False)  # the job's cluster (RAY_ADDRESS)
    request_resources(num_cpus=args.cpus or None, bundles=[{"GPU": 1}] * args.gpus or None)
    _log(f"asked the autoscaler for {args.gpus} GPU(s) and {args.cpus} CPU(s)")
    try:
        if not wait_for(args.gpus, args.cpus, args.wait_s):
            _log(
                f"the cluster did not reach {args.gpus} GPU(s) / {args.cpus} CPU(s) in {args.wait_s:g} s "
                "(instance quota, spot capacity, max_workers?); not starting the command"
            )
            return EXIT_NO_NODES
        return subprocess.call(command)
    finally:
        request_resources(num_cpus=0)  # withdraw: idle nodes may scale down again
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
