"""Runs a training job end to end: fold plan → Ray Train fits (folds in parallel) → metrics, predictions.

Layout under `OUT/runs/<name>/`: `run.json` (the plan: kind, inputs, classes, splits), `config.yaml` (the
resolved configuration, no secrets), `ray/<job>/` (Ray Train storage: a checkpoint per epoch),
`jobs/<job>/` (the fold's weights, test predictions and `result.json`), and once every fold is done
`metrics.json`, `predictions.parquet` and `curves.png`. Rerunning the same name resumes: finished folds
are skipped, unfinished ones continue from their last checkpoint.
"""

from __future__ import annotations

import io
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from slidestream.cluster.config import Config, TrainConfig
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import exists, filesystem, is_local, join, read_bytes, write_bytes_atomic
from slidestream.trainers.data import LabelledBags, TrainDataError
from slidestream.trainers.loop import PREDICTIONS_FILE, RESULT_FILE, WEIGHTS_FILE, FoldJob, train_fold
from slidestream.trainers.metrics import summarise
from slidestream.trainers.mhim import PRESETS
from slidestream.trainers.splits import FoldSplit, make_splits

__all__ = [
    "KINDS",
    "Run",
    "RunSummary",
    "TrainingError",
    "fit_job",
    "fit_loop",
    "format_table",
    "resolve_mhim",
    "run_training",
]

log = logging.getLogger(__name__)

KINDS = ("mil", "mhim")
RUN_FILE = "run.json"
# Settings that may change between a run and its resumption (resources, not results).
RESOURCE_KEYS = (
    "workers",
    "cpus_per_worker",
    "gpus_per_worker",
    "parallel_folds",
    "max_failures",
    "cache_mb",
)
_SUMMARY_KEYS = ("auc", "acc", "f1", "acc_at_0.5", "f1_at_0.5")


class TrainingError(RuntimeError):
    """A run that could not finish (some folds failed); the message names the folds and why."""


def resolve_mhim(train: TrainConfig) -> dict[str, Any]:
    """MHIM parameters: the preset (auto: the paper's CAMELYON16 recipe for the model), then every value
    set in the configuration."""
    options = train.mhim
    name = options.preset
    if name == "auto":
        name = "C16-TransMIL" if train.model == "transmil" else "C16-ABMIL"
    if name not in PRESETS:
        raise TrainDataError(
            f"train.mhim.preset: unknown preset {name!r}; choose auto or one of {list(PRESETS)}"
        )
    params = {k: v for k, v in PRESETS[name].items() if k != "model"}
    params.update({k: v for k, v in options.model_dump().items() if v is not None and k in params})
    params["preset"] = name
    return params


@dataclass
class RunSummary:
    name: str
    run_dir: str
    metrics: dict[str, Any]


class Run:
    """One named training run under an output root."""

    def __init__(
        self,
        kind: str,
        name: str,
        out: str,
        features: str,
        labels: str,
        config: Config,
        run_dir: str | None = None,
        fold: int | None = None,
    ) -> None:
        """`run_dir` places the run elsewhere than OUT/runs/NAME; `fold` keeps only that split of the first
        seed (ICMIL trains one split per round)."""
        if kind not in KINDS:
            raise TrainDataError(f"unknown training kind {kind!r}; choose one of {KINDS}")
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise TrainDataError(f"--name must be a plain name (no slashes), got {name!r}")
        self.kind, self.name, self.config = kind, name, config
        self.train = config.train
        self.run_dir = run_dir or join(out, "runs", name)
        self.features, self.labels = features, labels
        self.data = LabelledBags.open(features, labels, self.train.classes)
        self.splits = make_splits(
            self.data, self.train.folds, self.train.seeds, self.train.val_frac, self.train.protocol
        )
        if fold is not None:
            self.splits = [s for s in self.splits if s.seed == self.train.seeds[0] and s.fold == fold]
            if not self.splits:
                raise TrainDataError(f"fold {fold} does not exist in the fold plan of {labels}")
        self.mhim = resolve_mhim(self.train) if kind == "mhim" else None

    # -- plan ---------------------------------------------------------------------------------------------

    def plan(self) -> dict[str, Any]:
        train = {k: v for k, v in self.train.model_dump(mode="json").items() if k not in RESOURCE_KEYS}
        return {
            "kind": self.kind,
            "features": self.features,
            "labels": self.labels,
            "classes": self.data.classes,
            "dim": self.data.dim,
            "train": train,
            "mhim": self.mhim,
            "splits": [s.to_dict() for s in self.splits],
        }

    def _write_or_check_plan(self) -> None:
        if write_or_check_plan(self.run_dir, self.name, self.plan(), self.config):
            log.info("run %s exists: resuming (finished folds are kept)", self.name)

    def _teacher_weights(self, split: FoldSplit) -> tuple[str | None, list[str]]:
        """Where an MHIM fold's teacher comes from, and the job it needs first (teacher_init auto)."""
        init = self.train.mhim.teacher_init
        if init == "auto":
            base = f"mil-{split.name}"
            return join(self.run_dir, "jobs", base, WEIGHTS_FILE), [base]
        if init == "none":
            return None, []
        if init.endswith(".pt"):
            return init, []
        return join(init, "jobs", f"mil-{split.name}", WEIGHTS_FILE), []  # a baseline run's directory

    def jobs(self) -> list[FoldJob]:
        """Every fold job in dependency order (an MHIM fold after the baseline that seeds its teacher)."""
        jobs_dir = join(self.run_dir, "jobs")
        jobs: list[FoldJob] = []
        for split in self.splits:
            if self.kind == "mil":
                jobs.append(make_job("mil", split, self.data, self.train, jobs_dir))
                continue
            weights, needs = self._teacher_weights(split)
            if needs:
                jobs.append(make_job("mil", split, self.data, self.train, jobs_dir))
            extra = {"mhim": self.mhim, "teacher_weights": weights, "depends_on": needs}
            jobs.append(make_job("mhim", split, self.data, self.train, jobs_dir, **extra))
        return jobs

    # -- execution ----------------------------------------------------------------------------------------

    def execute(self) -> RunSummary:
        ensure_ray(self.config.ray)
        self._write_or_check_plan()
        jobs = self.jobs()
        chains = _chains(jobs)
        errors = _run_chains(chains, self._parallel_chains(), self.train, join(self.run_dir, "ray"))
        if errors:
            detail = "; ".join(f"{name}: {err}" for name, err in errors.items())
            raise TrainingError(f"run {self.name}: {len(errors)} fold(s) failed ({detail}); rerun to resume")
        return self._collect(jobs)

    def _parallel_chains(self) -> int:
        if self.train.parallel_folds:
            return self.train.parallel_folds
        import ray

        cpus = ray.cluster_resources().get("CPU", 1.0)
        per_fold = max(1, self.train.workers) * self.train.cpus_per_worker
        return max(1, int(cpus // per_fold))

    # -- results ------------------------------------------------------------------------------------------

    def _collect(self, jobs: list[FoldJob]) -> RunSummary:
        results = {j.name: json.loads(read_bytes(join(j.result_dir, RESULT_FILE))) for j in jobs}
        main = [j for j in jobs if j.kind == self.kind]
        rows = [{"seed": j.seed, "fold": j.fold, **results[j.name]["metrics"]} for j in main]
        mean, std = summarise([{k: v for k, v in r.items() if k not in ("seed", "fold")} for r in rows])
        metrics: dict[str, Any] = {
            "kind": self.kind,
            "model": self.train.model,
            "classes": self.data.classes,
            "folds": rows,
            "mean": mean,
            "std": std,
        }
        if self.mhim is not None:
            metrics["mhim"] = self.mhim
            baselines = [j for j in jobs if j.kind == "mil"]
            if baselines:
                base_rows = [
                    {"seed": j.seed, "fold": j.fold, **results[j.name]["metrics"]} for j in baselines
                ]
                b_mean, b_std = summarise(
                    [{k: v for k, v in r.items() if k not in ("seed", "fold")} for r in base_rows]
                )
                metrics["baseline"] = {"folds": base_rows, "mean": b_mean, "std": b_std}
        tables = [pq.read_table(io.BytesIO(read_bytes(join(j.result_dir, PREDICTIONS_FILE)))) for j in main]
        buffer = io.BytesIO()
        pq.write_table(pa.concat_tables(tables), buffer)
        write_bytes_atomic(join(self.run_dir, "predictions.parquet"), buffer.getvalue())
        from slidestream.trainers.viz import training_curves

        training_curves({name: r["history"] for name, r in results.items()}, join(self.run_dir, "curves.png"))
        write_bytes_atomic(join(self.run_dir, "metrics.json"), json.dumps(metrics, indent=1).encode())
        return RunSummary(self.name, self.run_dir, metrics)


def write_or_check_plan(run_dir: str, name: str, plan: dict[str, Any], config: Config) -> bool:
    """A new run saves its plan (`run.json`) and `config.yaml`; a rerun must have the same plan, else it
    is refused naming the settings that differ. True for a rerun (a resume)."""
    uri = join(run_dir, RUN_FILE)
    if not exists(uri):
        write_bytes_atomic(uri, json.dumps(plan, indent=1).encode())
        write_bytes_atomic(join(run_dir, "config.yaml"), config.to_yaml().encode())
        return False
    if changed := changed_settings(json.loads(read_bytes(uri)), plan):
        raise TrainDataError(
            f"run {name!r} already exists in {run_dir} with different "
            f"{', '.join(changed)}; rerun with the same settings to resume, or choose a new --name"
        )
    return True


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


def make_job(
    kind: str, split: FoldSplit, data: LabelledBags, train: TrainConfig, jobs_dir: str, **extra: Any
) -> FoldJob:
    """The FoldJob that trains `kind` on one split; its results go to `jobs_dir/<kind>-<split>`."""
    name = f"{kind}-{split.name}"
    targets = data.target_of()
    return FoldJob(
        name=name, kind=kind, seed=split.seed, fold=split.fold, train_ids=split.train, val_ids=split.val,
        test_ids=split.test, targets={s: targets[s] for s in (*split.train, *split.val, *split.test)},
        classes=data.classes, features=data.features, dim=data.dim, result_dir=join(jobs_dir, name),
        train=train.model_dump(mode="json"), **extra,
    )  # fmt: skip


def _chains(jobs: list[FoldJob]) -> list[list[FoldJob]]:
    """Jobs grouped so that each job follows the jobs it depends on, in one sequential chain."""
    chains: list[list[FoldJob]] = []
    home: dict[str, list[FoldJob]] = {}
    for job in jobs:
        chain = home[job.depends_on[0]] if job.depends_on else []
        if not job.depends_on:
            chains.append(chain)
        chain.append(job)
        home[job.name] = chain
    return chains


def fit_chain(chain: list[FoldJob], train: TrainConfig, storage: str) -> None:
    """Train a chain's unfinished jobs in order (a finished job has its result file)."""
    for job in chain:
        fit_job(job, train, storage)


def _run_chains(
    chains: list[list[FoldJob]], parallel: int, train: TrainConfig, storage: str
) -> dict[str, str]:
    """Run chains `parallel` at a time as Ray tasks (each starts its own Ray Train runs); errors by job."""
    import ray

    if parallel <= 1 or len(chains) <= 1:
        errors: dict[str, str] = {}
        for chain in chains:
            try:
                fit_chain(chain, train, storage)
            except Exception as exc:  # a failed fold must not stop the others
                errors[chain[-1].name] = _describe(exc)
        return errors
    remote = ray.remote(num_cpus=0, max_retries=0)(fit_chain)
    pending: dict[Any, str] = {}
    errors = {}
    queue = list(chains)
    while queue or pending:
        while queue and len(pending) < parallel:
            chain = queue.pop(0)
            pending[remote.remote(chain, train, storage)] = chain[-1].name
        ready, _ = ray.wait(list(pending), num_returns=1)
        name = pending.pop(ready[0])
        try:
            ray.get(ready[0])
        except Exception as exc:
            errors[name] = _describe(exc)
    return errors


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def train_storage(path: str) -> tuple[str, Any]:
    """Ray Train `storage_path` and `storage_filesystem` for a local path or an s3:// URI."""
    if is_local(path):
        return filesystem(path)[1], None
    import pyarrow.fs

    fs, inner = filesystem(path)
    return inner, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def fit_loop(loop: Any, loop_config: dict[str, Any], name: str, resources: Any, storage: str) -> None:
    """Run `loop(loop_config)` on Ray Train workers as run `name` under `storage` (resuming from its last
    checkpoint when there is one). `resources`: any settings object with workers, cpus_per_worker,
    gpus_per_worker and max_failures (TrainConfig, ICMILConfig)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 and resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    storage_path, storage_fs = train_storage(storage)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker if resources.workers else None,
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
    loop: Any, loop_config: dict[str, Any], name: str, resources: Any, storage: str, result_uri: str
) -> None:
    """`fit_loop`, unless `result_uri` (which the loop writes last) exists: a finished job is never
    retrained, an unfinished one resumes from its checkpoint. A loop that ends without it is an error."""
    if exists(result_uri):
        return
    fit_loop(loop, loop_config, name, resources, storage)
    if not exists(result_uri):
        raise TrainingError(f"{name}: training ended without writing {result_uri.rsplit('/', 1)[-1]}")


def fit_job(job: FoldJob, train: TrainConfig, storage: str) -> None:
    """Train one fold with Ray Train, unless it has finished."""
    fit_once(train_fold, job.to_config(), job.name, train, storage, join(job.result_dir, RESULT_FILE))


def format_table(metrics: dict[str, Any]) -> str:
    """The per-fold table and mean ± std that `slidestream train` prints."""
    keys = [k for k in _SUMMARY_KEYS if k in metrics["mean"]]
    lines = [f"{'seed':>4} {'fold':>4} " + " ".join(f"{k:>10}" for k in keys)]
    for row in metrics["folds"]:
        lines.append(f"{row['seed']:>4} {row['fold']:>4} " + " ".join(f"{row[k]:>10.4f}" for k in keys))
    lines.append(
        f"{'mean ± std':>9} " + " ".join(f"{_pm(metrics['mean'][k], metrics['std'][k]):>10}" for k in keys)
    )
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return "nan" if math.isnan(mean) else f"{mean:.3f}±{std:.3f}"


def run_training(kind: str, name: str, out: str, features: str, labels: str, config: Config) -> RunSummary:
    return Run(kind, name, out, features, labels, config).execute()
