"""Ray Tune sweeps over the MIL trainers: a search space from YAML, ASHA early stopping, one fold split
per trial, resumable; a results table, a plot and the best configuration as a `--config` file.

Search space file (dotted config keys, one distribution each)::

    train.lr: {loguniform: [1.0e-5, 1.0e-3]}
    train.weight_decay: {choice: [0.0, 1.0e-5, 1.0e-4]}
    train.mhim.mask_ratio: {uniform: [0.0, 0.8]}
    train.model_options.gated: {grid: [true, false]}

Trials select on the VALIDATION part of the split (`train.monitor`); test metrics are recorded, never used.
With `train.workers: 0` a trial runs the training loop itself and reports every epoch, so ASHA can stop
poor trials early; with workers ≥ 1 each trial is a distributed Ray Train run that reports once at the end.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from cluster.config import Config, ConfigError, with_values
from cluster.runtime import ensure_ray
from cluster.storage import filesystem, join, read_bytes, write_bytes_atomic
from trainers.data import LabelledBags
from trainers.loop import RESULT_FILE, WEIGHTS_FILE, train_fold
from trainers.runner import fit_job, make_job, resolve_mhim, train_storage
from trainers.splits import FoldSplit, make_splits

__all__ = ["SweepSummary", "load_space", "run_sweep"]

log = logging.getLogger(__name__)

SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SweepError(ValueError):
    """A search space or sweep that cannot be run; the message names the file and the key."""


@dataclass
class SweepSummary:
    sweep_dir: str
    best_params: dict[str, Any]
    best_config: str  # URI of the best configuration YAML
    table: list[dict[str, Any]]


def _domain(key: str, spec: Any, where: str) -> tuple[Any, Any]:
    """A Tune domain for one key, and a sample value used to validate the key against the config."""
    from ray import tune

    if not isinstance(spec, dict) or len(spec) != 1:
        raise SweepError(
            f"{where}: {key} must be one of {{kind: args}} with kind in {SPACE_KINDS}, got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if kind not in SPACE_KINDS:
        raise SweepError(f"{where}: {key}: unknown distribution {kind!r}; use one of {SPACE_KINDS}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise SweepError(f"{where}: {key}: {kind} needs a non-empty list of values")
        return (tune.choice(args) if kind == "choice" else tune.grid_search(args)), args[0]
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, int | float) for a in args)):
        raise SweepError(f"{where}: {key}: {kind} needs [low, high], got {args!r}")
    low, high = args
    if not low < high or (kind == "loguniform" and low <= 0):
        raise SweepError(f"{where}: {key}: {kind} needs 0 < low < high (log) or low < high, got {args!r}")
    domain = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](
        low, high
    )
    return domain, low


def load_space(uri: str, config: Config) -> dict[str, Any]:
    """The search space in `uri` as Tune domains; every key must be a valid config key for its values."""
    try:
        raw = yaml.safe_load(read_bytes(uri))
    except FileNotFoundError:
        raise SweepError(f"search space file not found: {uri}") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"search space file {uri} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise SweepError(f"search space file {uri} must map config keys to distributions")
    space = {}
    for key, spec in raw.items():
        space[key], sample = _domain(str(key), spec, uri)
        try:
            with_values(config, {key: sample}, where=f"search space {uri}:")
        except ConfigError as exc:
            raise SweepError(
                f"search space {uri}: key {key!r} does not fit the configuration: {exc}"
            ) from None
    return space


def _trial(params: dict[str, Any], *, base: dict, data: LabelledBags, split: FoldSplit, kind: str,
           trials_dir: str, teacher_weights: str | None) -> None:  # fmt: skip
    """One trial: the fold split trained with the trial's parameters."""
    import ray.tune

    config = with_values(Config.model_validate(base), params)
    trial_id = ray.tune.get_context().get_trial_id()
    extra: dict[str, Any] = {}
    if kind == "mhim":
        extra = {"mhim": resolve_mhim(config.train), "teacher_weights": teacher_weights}
    job = make_job(kind, split, data, config.train, join(trials_dir, trial_id), **extra)
    if config.train.workers == 0:
        job.reporter = "tune"
        train_fold(job.to_config())
        return
    fit_job(job, config.train, join(trials_dir, trial_id, "ray"))
    result = json.loads(read_bytes(join(job.result_dir, RESULT_FILE)))
    best = result["history"][result["metrics"]["best_epoch"]]
    ray.tune.report({**best, "test_auc": result["metrics"]["auc"]})


class Sweep:
    """One named sweep under `OUT/tune/<name>/` (Tune's own files, trials, results, best config)."""

    def __init__(self, kind: str, name: str, out: str, features: str, labels: str, space_uri: str,
                 config: Config, trials: int) -> None:  # fmt: skip
        if kind not in ("mil", "mhim"):
            raise SweepError(f"tune supports mil and mhim here, not {kind!r}")
        self.kind, self.name, self.config, self.trials = kind, name, config, trials
        self.tune_root = join(out, "tune")
        self.sweep_dir = join(self.tune_root, name)
        self.space = load_space(space_uri, config)
        self.keys = list(self.space)
        train = config.train
        self.data = LabelledBags.open(features, labels, train.classes)
        self.split = make_splits(self.data, train.folds, train.seeds[:1], train.val_frac, train.protocol)[0]
        self.monitor = train.monitor
        self.mode = "min" if self.monitor == "val_loss" else "max"

    def _teacher(self) -> str | None:
        """For MHIM with teacher_init auto: the split's baseline, trained once for the whole sweep."""
        init = self.config.train.mhim.teacher_init
        if self.kind != "mhim" or init == "none":
            return None
        if init != "auto":
            return (
                init if init.endswith(".pt") else join(init, "jobs", f"mil-{self.split.name}", WEIGHTS_FILE)
            )
        job = make_job("mil", self.split, self.data, self.config.train, join(self.sweep_dir, "teacher"))
        fs, path = filesystem(join(job.result_dir, RESULT_FILE))
        if not fs.exists(path):
            fit_job(job, self.config.train, join(self.sweep_dir, "teacher", "ray"))
        return join(job.result_dir, WEIGHTS_FILE)

    def _tuner(self) -> Any:
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler

        train = self.config.train
        trainable = tune.with_parameters(
            _trial, base=self.config.model_dump(mode="json"), data=self.data, split=self.split,
            kind=self.kind, trials_dir=join(self.sweep_dir, "trials"), teacher_weights=self._teacher(),
        )  # fmt: skip
        cpus = train.cpus_per_worker if train.workers == 0 else 0.0  # distributed trials hold their workers
        trainable = tune.with_resources(trainable, {"cpu": cpus})
        root, storage = train_storage(self.tune_root)
        where = f"{root.rstrip('/')}/{self.name}"
        if tune.Tuner.can_restore(where, storage_filesystem=storage):
            log.info("sweep %s exists: resuming unfinished trials", self.name)
            return tune.Tuner.restore(
                where, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage
            )
        # max_t beyond the last epoch: ASHA never cuts a trial at its final epoch, so the trial finishes
        # by itself and writes its fold result (best weights, test metrics).
        grace = max(1, min(train.min_epochs, train.epochs))
        scheduler = ASHAScheduler(max_t=train.epochs + 1, grace_period=grace)
        return tune.Tuner(
            trainable,
            param_space=self.space,
            tune_config=tune.TuneConfig(
                metric=self.monitor, mode=self.mode, scheduler=scheduler, num_samples=self.trials
            ),
            run_config=tune.RunConfig(
                name=self.name, storage_path=root, storage_filesystem=storage, verbose=_verbosity()
            ),
        )

    def run(self) -> SweepSummary:
        ensure_ray(self.config.ray)
        results = self._tuner().fit()
        rows = [self._row(r) for r in results]
        rows = [r for r in rows if r is not None]
        if not rows:
            errors = [str(r.error).splitlines()[-1] for r in results if r.error]
            raise SweepError(f"sweep {self.name}: no trial reported a result ({'; '.join(errors[:3])})")
        best = (min if self.mode == "min" else max)(rows, key=lambda r: _sortable(r[self.monitor], self.mode))
        best_params = {k: best[k] for k in self.keys}
        best_config = with_values(self.config, best_params)
        best_uri = join(self.sweep_dir, "best_config.yaml")
        header = (
            f"# best of sweep {self.name} ({self.monitor} = {best[self.monitor]:.4f}); use with --config\n"
        )
        write_bytes_atomic(best_uri, (header + best_config.to_yaml()).encode())
        self._write_table(rows)
        return SweepSummary(self.sweep_dir, best_params, best_uri, rows)

    def _row(self, result: Any) -> dict[str, Any] | None:
        history = result.metrics_dataframe
        if history is None or history.empty or self.monitor not in history:
            return None
        values = history[self.monitor]
        best = values.min() if self.mode == "min" else values.max()
        params = {k: result.config[k] for k in self.keys}
        trial = str(history["trial_id"].iloc[-1]) if "trial_id" in history else result.path.rsplit("/", 1)[-1]
        row = {"trial": trial, **params, self.monitor: float(best)}
        row["epochs"] = int(history["training_iteration"].max())
        result_uri = join(self.sweep_dir, "trials", trial, f"{self.kind}-{self.split.name}", RESULT_FILE)
        fs, path = filesystem(result_uri)
        if fs.exists(path):  # finished trials (not stopped early): test metrics, recorded only
            row["test_auc"] = float(json.loads(read_bytes(result_uri))["metrics"]["auc"])
        elif "test_auc" in history:  # distributed trials report it with their result
            row["test_auc"] = float(history["test_auc"].iloc[-1])
        row["error"] = str(result.error).splitlines()[-1] if result.error else ""
        return row

    def _write_table(self, rows: list[dict[str, Any]]) -> None:
        table = pa.Table.from_pylist(rows)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        write_bytes_atomic(join(self.sweep_dir, "results.parquet"), buffer.getvalue())
        text = io.BytesIO()
        pacsv.write_csv(table, text)
        write_bytes_atomic(join(self.sweep_dir, "results.csv"), text.getvalue())
        from trainers.viz import sweep_plot

        sweep_plot(rows, self.keys, self.monitor, join(self.sweep_dir, "results.png"))


def _sortable(value: float, mode: str) -> float:
    if math.isfinite(value):
        return value
    return math.inf if mode == "min" else -math.inf


def _verbosity() -> int:
    """Tune's progress table unless progress output is switched off (SLIDESTREAM_PROGRESS=0)."""
    return 1 if os.environ.get("SLIDESTREAM_PROGRESS", "1") != "0" else 0


def run_sweep(kind: str, name: str, out: str, features: str, labels: str, space: str, config: Config,
              trials: int) -> SweepSummary:  # fmt: skip
    return Sweep(kind, name, out, features, labels, space, config, trials).run()
