"""Ray Tune sweeps (`mil`, `mhim`, `gigassl`, `cdma`): a search space from YAML, ASHA early stopping, one
fold split per trial, resumable; a results table, a plot and the best configuration as a `--config` file.

Search space file (dotted config keys, one distribution each)::

    train.lr: {loguniform: [1.0e-5, 1.0e-3]}
    train.weight_decay: {choice: [0.0, 1.0e-5, 1.0e-4]}
    train.mhim.mask_ratio: {uniform: [0.0, 0.8]}
    train.model_options.gated: {grid: [true, false]}

Trials are compared on VALIDATION slides (what each kind reports is in `trainers/tune/targets.py`); test
metrics are recorded, never used. With 0 workers (`train.workers`, `gigassl.workers`, `cdma.workers`) a
trial runs the training loop itself and reports every epoch, so ASHA can stop poor trials early; with
workers ≥ 1 each trial is a distributed Ray Train run that reports once at the end.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from slidestream.cluster.config import Config, ConfigError, with_values
from slidestream.cluster.console_routing import console_mode
from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import join, read_bytes, write_bytes_atomic
from slidestream.trainers.data import TrainDataError
from slidestream.trainers.fit import train_storage, trains_in_process
from slidestream.trainers.tune.targets import make_target

__all__ = ["SweepSummary", "early_stopping", "load_space", "run_sweep"]

log = logging.getLogger(__name__)

SPACE_KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
# A distributed trial only launches its Ray Train run, whose workers reserve their own CPUs; Tune refuses
# an empty request, so the launcher holds a sliver.
LAUNCHER_CPU = 0.01


class SweepError(SlidestreamError, ValueError):
    """A search space or sweep that cannot be run; the message names the file and the key."""


@dataclass
class SweepSummary:
    sweep_dir: str
    monitor: str
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


class Sweep:
    """One named sweep under `OUT/tune/<name>/` (Tune's own files, trials, results, best config)."""

    def __init__(self, kind: str, name: str, out: str, space_uri: str, config: Config, trials: int,
                 features: str | None = None, labels: str | None = None) -> None:  # fmt: skip
        self.name, self.config, self.trials = name, config, trials
        self.tune_root = join(out, "tune")
        self.sweep_dir = join(self.tune_root, name)
        self.space = load_space(space_uri, config)
        self.keys = list(self.space)
        try:
            self.target = make_target(kind, config, out, features, labels)
        except TrainDataError as exc:
            raise SweepError(str(exc)) from None
        self.monitor, self.mode = self.target.monitor, self.target.mode

    def _tuner(self) -> Any:
        from ray import tune

        target = self.target
        trainable = tune.with_parameters(
            target.trial, base=self.config.model_dump(mode="json"),
            trials_dir=join(self.sweep_dir, "trials"), **target.trial_arguments(self.sweep_dir),
        )  # fmt: skip
        resources = target.resources
        cpus = resources.cpus_per_worker if trains_in_process(resources) else LAUNCHER_CPU
        trainable = tune.with_resources(trainable, {"cpu": cpus})
        root, storage = train_storage(self.tune_root)
        where = f"{root.rstrip('/')}/{self.name}"
        if tune.Tuner.can_restore(where, storage_filesystem=storage):
            log.info("sweep %s exists: resuming unfinished trials", self.name)
            return tune.Tuner.restore(
                where, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=storage
            )
        scheduler = early_stopping(target.epochs, target.grace)
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
        rows = [row for r in results if (row := self._row(r)) is not None]
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
        return SweepSummary(self.sweep_dir, self.monitor, best_params, best_uri, rows)

    def _row(self, result: Any) -> dict[str, Any] | None:
        history = result.metrics_dataframe
        if history is None or history.empty or self.monitor not in history:
            return None
        values = history[self.monitor]
        if self.target.keep == "best" and values.notna().any():
            counted = history.loc[values.idxmin() if self.mode == "min" else values.idxmax()]
        else:  # the last epoch counts (or no epoch has a value)
            counted = history.iloc[-1]
        params = {k: result.config[k] for k in self.keys}
        trial = str(history["trial_id"].iloc[-1]) if "trial_id" in history else result.path.rsplit("/", 1)[-1]
        row = {"trial": trial, **params, self.monitor: float(counted[self.monitor])}
        trained = history["epochs_trained"] if "epochs_trained" in history else history["training_iteration"]
        row["epochs"] = int(trained.max())  # distributed trials report once, with the epochs they trained
        test = self.target.test_value(self.sweep_dir, trial, counted.to_dict())
        if test is not None and self.target.test_metric is not None:
            row[self.target.test_metric] = test
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
        from slidestream.trainers.viz import sweep_plot

        sweep_plot(rows, self.keys, self.monitor, join(self.sweep_dir, "results.png"))


def early_stopping(epochs: int, grace: int) -> Any:
    """ASHA that compares trials after `grace` epochs and never after the final one.

    A cut at the final epoch saves no training but can lose the trial's result: Tune stops the trial
    while it writes its weights and history. So ASHA's rungs stop at `epochs - 1` and it does not stop
    trials that reach that point; when no rung fits (grace ≥ epochs), trials simply run to the end."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    last_cut = epochs - 1
    if grace > last_cut:
        return FIFOScheduler()
    return ASHAScheduler(max_t=last_cut, grace_period=grace, stop_last_trials=False)


def _sortable(value: float, mode: str) -> float:
    if math.isfinite(value):
        return value
    return math.inf if mode == "min" else -math.inf


def _verbosity() -> int:
    """Tune's progress table, unless progress output is switched off (SLIDESTREAM_PROGRESS=0) or the
    quiet console shows the trials' epoch lines instead."""
    return 1 if os.environ.get("SLIDESTREAM_PROGRESS", "1") != "0" and console_mode() != "quiet" else 0


def run_sweep(kind: str, name: str, out: str, space: str, config: Config, trials: int,
              features: str | None = None, labels: str | None = None) -> SweepSummary:  # fmt: skip
    return Sweep(kind, name, out, space, config, trials, features, labels).run()
