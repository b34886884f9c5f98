"""Fitting a training loop with Ray Train, the same way for every method: resources, storage (local or
s3://), resuming, a job trained once, and the saved plan that a rerun must match.
"""

from __future__ import annotations

import json
from typing import Any

from slidestream.cluster.config import Config, WorkerResources
from slidestream.cluster.storage import exists, filesystem, is_local, join, read_bytes, write_bytes_atomic
from slidestream.trainers.data import TrainDataError
from slidestream.trainers.session import in_process_checkpoints

RUN_FILE = "run.json"
# Settings that may change between a run and its resumption (resources, not results).
RESOURCE_KEYS = (*WorkerResources.model_fields, "parallel_folds", "cache_mb")


class TrainingError(RuntimeError):
    """A run that could not finish (some folds failed); the message names the folds and why."""


def write_or_check_plan(
    run_dir: str, name: str, plan: dict[str, Any], config: Config, may_add_seeds: bool = False
) -> bool:
    """A new run saves its plan (`run.json`) and `config.yaml`; a rerun must have the same plan, else it
    is refused naming the settings that differ. True for a rerun (a resume). With `may_add_seeds` (a run
    of independent per-seed splits) a rerun may also list more seeds: the plan is saved again and the
    finished splits are kept."""
    uri = join(run_dir, RUN_FILE)
    if not exists(uri):
        _write_plan(run_dir, plan, config)
        return False
    saved = with_new_settings(json.loads(read_bytes(uri)), plan, Config().model_dump(mode="json"))
    if may_add_seeds and adds_seeds_only(saved, plan):
        _write_plan(run_dir, plan, config)
        return True
    if changed := changed_settings(saved, plan):
        raise TrainDataError(
            f"run {name!r} already exists in {run_dir} with different "
            f"{', '.join(changed)}; rerun with the same settings to resume, or choose a new --name"
        )
    return True


def _write_plan(run_dir: str, plan: dict[str, Any], config: Config) -> None:
    write_bytes_atomic(join(run_dir, RUN_FILE), json.dumps(plan, indent=1).encode())
    write_bytes_atomic(join(run_dir, "config.yaml"), config.to_yaml().encode())


def with_new_settings(
    saved: dict[str, Any], plan: dict[str, Any], defaults: dict[str, Any]
) -> dict[str, Any]:
    """`saved` with the settings that `plan` has and `saved` lacks (config settings added since the run was
    saved) filled in at their defaults: a new setting's default keeps the old behaviour, so an upgrade
    alone never refuses a resume. `defaults` is the config's default dump (plan sections are named by it)."""
    filled = dict(saved)
    for key, new in plan.items():
        if key not in defaults:
            continue
        default, old = defaults[key], saved.get(key)
        if key not in saved:
            filled[key] = default
        elif isinstance(old, dict) and isinstance(new, dict) and isinstance(default, dict):
            filled[key] = with_new_settings(old, new, default)
    return filled


def adds_seeds_only(saved: dict[str, Any], plan: dict[str, Any]) -> bool:
    """True when `plan` is `saved` with seeds added: every saved seed and split is still there, unchanged,
    and nothing else differs."""
    old_seeds, new_seeds = saved["train"]["seeds"], plan["train"]["seeds"]
    if not set(old_seeds) < set(new_seeds):
        return False
    same_seeds = {**saved, "train": {**saved["train"], "seeds": new_seeds}}
    if changed_settings(same_seeds, plan) != ["splits"]:
        return False
    return all(split in plan["splits"] for split in saved["splits"])


def changed_settings(saved: dict[str, Any], plan: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the plan entries that differ (e.g. `train.model ('abmil' → 'dsmil')`)."""
    changed = []
    for key in sorted(set(saved) | set(plan)):
        old, new = saved.get(key), plan.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_settings(old, new, f"{prefix}{key}.")
        elif isinstance(old, list | dict) or isinstance(new, list | dict):
            changed.append(prefix + key)
        else:
            changed.append(f"{prefix}{key} ({old!r} → {new!r})")
    return changed


def describe_error(exc: BaseException) -> str:
    """The last line of an exception's message (Ray wraps the cause in a long traceback)."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def train_storage(path: str) -> tuple[str, Any]:
    """Ray Train `storage_path` and `storage_filesystem` for a local path or an s3:// URI."""
    if is_local(path):
        return filesystem(path)[1], None
    import pyarrow.fs

    fs, inner = filesystem(path)
    return inner, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _gpu_workers(resources: WorkerResources) -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0 and resources.gpus_per_worker > 0


def trains_in_process(resources: WorkerResources) -> bool:
    """`workers: 0`, or `auto` on a cluster without GPUs: the loop runs in the calling process (a fold's
    Ray task), which saves starting a worker group per job: 3.5× faster on a 10-fold, 100-bag CPU run with
    the same metrics (bench/RESULTS.md). With GPUs, `auto` is one Ray Train worker holding a GPU."""
    return resources.workers == 0 or (resources.workers == "auto" and not _gpu_workers(resources))


def worker_count(resources: WorkerResources) -> int:
    """The processes a job trains in: its Ray Train workers, or the one calling process."""
    return resources.workers if isinstance(resources.workers, int) and resources.workers > 0 else 1


def fit_loop(
    loop: Any, loop_config: dict[str, Any], name: str, resources: WorkerResources, storage: str
) -> None:
    """Run `loop(loop_config)` as run `name` under `storage`, resuming from its last checkpoint when there
    is one: on Ray Train workers, or in this process (`trains_in_process`; the checkpoint is kept under
    `storage/name/in_process/`)."""
    if trains_in_process(resources):
        with in_process_checkpoints(join(storage, name, "in_process")):
            loop(loop_config)
        return
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = _gpu_workers(resources)
    workers = worker_count(resources)
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    storage_path, storage_fs = train_storage(storage)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()


def fit_once(
    loop: Any,
    loop_config: dict[str, Any],
    name: str,
    resources: WorkerResources,
    storage: str,
    result_uri: str,
) -> None:
    """`fit_loop`, unless `result_uri` (which the loop writes last) exists: a finished job is never
    retrained, an unfinished one resumes from its checkpoint. A loop that ends without it is an error."""
    if exists(result_uri):
        return
    fit_loop(loop, loop_config, name, resources, storage)
    if not exists(result_uri):
        raise TrainingError(f"{name}: training ended without writing {result_uri.rsplit('/', 1)[-1]}")
