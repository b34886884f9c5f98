"""Small helpers the tests share: configs for 2 local CPUs, the environment of a driver on the session's
Ray, and reading back what was committed."""

from __future__ import annotations

import os
import re
from collections import Counter

import ray

from slidestream.cluster.config import Config, load_config
from slidestream.pipelines.shards import iter_shard_samples
from slidestream.pipelines.tile_store import committed_shards


def make_config(*overrides: str) -> Config:
    """The default config on 2 local CPUs, plus `key=value` overrides."""
    return load_config(None, ["ray.num_cpus=2", "ray.object_store_mb=512", *overrides])


def session_driver_env() -> dict[str, str]:
    """The environment of a subprocess driver that joins this test session's Ray instance, as a driver on a
    cluster does. Read when called: once Ray has started, the environment carries its auth token."""
    return {**os.environ, "SLIDESTREAM_PROGRESS": "0", "RAY_ADDRESS": ray.get_runtime_context().gcs_address}


# Lines that only Ray's internals print: worker-output prefixes, the raylet's notices, native log lines,
# Ray Data's executor and progress tables, Ray Train's per-report lines, and the multi-instance errors.
RAY_INTERNAL = re.compile(
    r"\(raylet\)|pid=\d+\)|core_worker\.cc|streaming_executor|logging_progress|Token authentication"
    r"|RayDeprecationWarning|Checkpoint successfully|Reporting training result|PlacementGroupCleaner"
    r"|PreemptionWatcher|multiple active Ray instances|Traceback|ConnectionError"
)


def ray_internal_lines(text: str) -> list[str]:
    """The lines of a console's output that are Ray's internals (none, with the quiet console)."""
    return [line for line in text.splitlines() if RAY_INTERNAL.search(line)]


def committed_samples(out: str, config: Config) -> dict[str, dict]:
    """Every committed tile sample by key; fails on a key committed twice."""
    samples: dict[str, dict] = {}
    counts: Counter[str] = Counter()
    for uris in committed_shards(out, config.tiling).values():
        for uri in uris:
            for sample in iter_shard_samples(uri):
                counts[sample["__key__"]] += 1
                samples[sample["__key__"]] = sample
    duplicated = [key for key, n in counts.items() if n > 1]
    assert not duplicated, f"tiles committed more than once: {duplicated[:5]}"
    return samples
