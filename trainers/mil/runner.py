"""Runs a training job end to end: fold plan → Ray Train fits (folds in parallel) → metrics, predictions.

Layout under `OUT/runs/<name>/`: `run.json` (the plan: kind, inputs, classes, splits), `config.yaml` (the
resolved configuration, no secrets), `ray/<job>/` (Ray Train storage: a checkpoint per epoch),
`jobs/<job>/` (the fold's weights, test predictions and `result.json`), and once every fold is done
`metrics.json` (with `pooled_lr`: the mean+max-pooled logistic regression on the same folds, beside the
model's metrics), `predictions.parquet` and `curves.png`. Rerunning the same name resumes: finished
folds are skipped, unfinished ones continue from their last checkpoint.
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
from slidestream.cluster.storage import join, read_bytes, write_bytes_atomic
from slidestream.trainers.data import LabelledBags, TrainDataError
from slidestream.trainers.fit import (
    RESOURCE_KEYS,
    TrainingError,
    describe_error,
    fit_once,
    worker_count,
    write_or_check_plan,
)
from slidestream.trainers.methods import TrainRequest
from slidestream.trainers.metrics import summarise
from slidestream.trainers.mil.loop import PREDICTIONS_FILE, FoldJob, train_fold
from slidestream.trainers.mil.mhim import PRESETS
from slidestream.trainers.mil.pooled_baseline import pooled_baseline
from slidestream.trainers.session import RESULT_FILE, WEIGHTS_FILE
from slidestream.trainers.splits import FoldSplit, make_splits

__all__ = [
    "KINDS",
    "Run",
    "RunSummary",
    "fit_job",
    "format_table",
    "resolve_mhim",
    "run_mil",
    "run_training",
]

log = logging.getLogger(__name__)

KINDS = ("mil", "mhim")
_SUMMARY_KEYS = ("auc", "acc", "f1", "acc_at_0.5", "f1_at_0.5")


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
        if write_or_check_plan(self.run_dir, self.name, self.plan(), self.config, may_add_seeds=True):
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
        per_fold = worker_count(self.train) * self.train.cpus_per_worker
        return max(1, int(cpus // per_fold))

    # -- results ------------------------------------------------------------------------------------------

    def _collect(self, jobs: list[FoldJob]) -> RunSummary:
        results = {j.name: json.loads(read_bytes(join(j.result_dir, RESULT_FILE))) for j in jobs}
        main = [j for j in jobs if j.kind == self.kind]
        metrics: dict[str, Any] = {
            "kind": self.kind,
            "model": self.train.model,
            "classes": self.data.classes,
            **_fold_summary(main, results),
            "pooled_lr": pooled_baseline(self.data, self.splits),
        }
        if self.mhim is not None:
            metrics["mhim"] = self.mhim
            baselines = [j for j in jobs if j.kind == "mil"]
            if baselines:
                metrics["baseline"] = _fold_summary(baselines, results)
        tables = [pq.read_table(io.BytesIO(read_bytes(join(j.result_dir, PREDICTIONS_FILE)))) for j in main]
        buffer = io.BytesIO()
        pq.write_table(pa.concat_tables(tables), buffer)
        write_bytes_atomic(join(self.run_dir, "predictions.parquet"), buffer.getvalue())
        from slidestream.trainers.viz import training_curves

        training_curves({name: r["history"] for name, r in results.items()}, join(self.run_dir, "curves.png"))
        write_bytes_atomic(join(self.run_dir, "metrics.json"), json.dumps(metrics, indent=1).encode())
        return RunSummary(self.name, self.run_dir, metrics)


def _fold_summary(jobs: list[FoldJob], results: dict[str, Any]) -> dict[str, Any]:
    """Per-fold metrics of `jobs` and their mean and std."""
    rows = [{"seed": j.seed, "fold": j.fold, **results[j.name]["metrics"]} for j in jobs]
    mean, std = summarise([{k: v for k, v in r.items() if k not in ("seed", "fold")} for r in rows])
    return {"folds": rows, "mean": mean, "std": std}


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
                errors[chain[-1].name] = describe_error(exc)
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
            errors[name] = describe_error(exc)
    return errors


def fit_job(job: FoldJob, train: TrainConfig, storage: str) -> None:
    """Train one fold with Ray Train, unless it has finished."""
    fit_once(train_fold, job.to_config(), job.name, train, storage, join(job.result_dir, RESULT_FILE))


def format_table(metrics: dict[str, Any]) -> str:
    """The per-fold table and mean ± std that `slidestream train` prints: the model's metrics, then the
    mean+max-pooled logistic regression's on the same folds."""
    keys = [k for k in _SUMMARY_KEYS if k in metrics["mean"]]
    lines = [f"{'':>8} {'seed':>4} {'fold':>4} " + " ".join(f"{k:>11}" for k in keys)]
    sources = [(metrics["model"], metrics)]
    if "pooled_lr" in metrics:
        sources.append(("lr", metrics["pooled_lr"]))
    for label, source in sources:
        for row in source["folds"]:
            values = " ".join(f"{row[k]:>11.4f}" for k in keys)
            lines.append(f"{label:>8} {row['seed']:>4} {row['fold']:>4} {values}")
    for label, source in sources:
        values = " ".join(f"{_pm(source['mean'][k], source['std'][k]):>11}" for k in keys)
        lines.append(f"{label:>8} {'mean ± std':>9} {values}")
    return "\n".join(lines)


def _pm(mean: float, std: float) -> str:
    return "nan" if math.isnan(mean) else f"{mean:.3f}±{std:.3f}"


def run_training(kind: str, name: str, out: str, features: str, labels: str, config: Config) -> RunSummary:
    return Run(kind, name, out, features, labels, config).execute()


def run_mil(request: TrainRequest, config: Config) -> dict[str, Any]:
    """`slidestream train mil|mhim` (the method table's entry): the metrics that `format_table` prints."""
    assert request.feature_dir and request.labels  # the command line made sure of them (the method table)
    print(f"train {request.kind}: {config.train.model} on {request.feature_dir} → {request.run_dir}")
    run = Run(request.kind, request.name, request.out, request.feature_dir, request.labels, config)
    return run.execute().metrics
