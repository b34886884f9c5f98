"""Start or connect to Ray, and set the Ray Data limits that keep pipelines in bounded memory."""

from __future__ import annotations

import json
import logging
import os

import ray
from ray.data import DataContext, ExecutionResources

from slidestream.cluster.config import RayConfig
from slidestream.cluster.console_routing import (
    CONSOLE_ENV,
    adopt_ray_loggers,
    console_mode,
    route_worker_output,
)
from slidestream.cluster.storage import STORAGE_ENV_VARS

log = logging.getLogger(__name__)


# Ray Train's controller polls its workers at this interval, and a reported epoch waits for the poll:
# Ray's default makes short epochs (small MIL data sets) spend most of their time waiting.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_DEFAULT_S = "0.2"
# Set by Ray for the driver of a submitted job: the job's config, runtime env included.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Ray Train watches for node preemption (spot instances) with an actor per run: nothing to watch on a
# local instance, whose driver's core worker otherwise logs an error line about it at every run's end.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def runtime_env_vars() -> dict[str, str]:
    """Storage variables for every worker (values are never logged) and Ray Train's poll interval."""
    env = {name: os.environ[name] for name in (*STORAGE_ENV_VARS, CONSOLE_ENV) if os.environ.get(name)}
    env[TRAIN_POLL_ENV] = _train_poll_interval()
    return env


def _train_poll_interval() -> str:
    """Ray Train's poll interval: the user's, else ours (set in this environment, which a local
    instance's workers inherit)."""
    return os.environ.setdefault(TRAIN_POLL_ENV, TRAIN_POLL_DEFAULT_S)


def driver_runtime_env() -> dict | None:
    """The runtime env a driver asks for. Inside a Ray job (`slidestream submit`, `ray job submit`) the
    job's runtime env already applies to every worker, and Ray refuses a variable set in both: only the
    variables the job does not set are added."""
    env = runtime_env_vars()
    if job_config := os.environ.get(JOB_CONFIG_ENV):
        try:
            job_vars = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            job_vars = {}
        env = {name: value for name, value in env.items() if name not in job_vars}
    return {"env_vars": env} if env else None


def ensure_ray(config: RayConfig) -> None:
    """Connect to `config.address`, or start a local instance; a no-op when Ray is already up."""
    if not ray.is_initialized():
        adopt_ray_loggers()
        address = config.address or os.environ.get("RAY_ADDRESS")
        kwargs: dict = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
        if address:
            ray.init(address=address, runtime_env=driver_runtime_env(), **kwargs)
            log.info("connected to Ray at %s", address)
        else:
            cpus = config.num_cpus or os.cpu_count() or 1
            _train_poll_interval()
            os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
            # No runtime env: a local instance's workers inherit this process's environment (storage
            # variables included). Ray starts one idle worker per core ahead of the first task, but
            # only without a runtime env; with one, the first tasks wait for new workers to start.
            ray.init(
                # "local": a new instance even when a `ray start` head runs on this machine (Ray would
                # otherwise connect to the head recorded in /tmp/ray/ray_current_cluster).
                address="local",
                num_cpus=cpus,
                object_store_memory=config.object_store_mb * 1024 * 1024,
                # Fractional-CPU tasks run more worker processes than cores; by default Ray kills idle
                # workers above one per core and restarts them for the next task (seconds of imports each).
                _system_config={"num_workers_soft_limit": 4 * cpus},
                **kwargs,
            )
            log.info("started a local Ray instance")
        adopt_ray_loggers()
        route_worker_output()
    context = DataContext.get_current()
    context.execution_options.resource_limits = ExecutionResources(
        object_store_memory=config.data_memory_mb * 1024 * 1024
    )
    # The console draws its own progress line; Ray Data's bars (or, off a terminal, its periodic
    # operator tables) only with -v.
    bars_wanted = os.environ.get("SLIDESTREAM_PROGRESS", "1") != "0"
    context.enable_progress_bars = bars_wanted and console_mode() != "quiet"
