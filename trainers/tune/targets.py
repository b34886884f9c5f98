"""What one sweep trial trains for each kind of sweep, and the metric its trials are compared on.

- `mil` / `mhim`: one MIL fold split; `train.monitor` on the validation slides, the best epoch counts
  (training keeps the best epoch's weights); the test AUC is recorded.
- `gigassl`: Giga-SSL on the view sets; after every epoch a linear probe of the slide embeddings is fitted
  on a fold split's training slides and scored on its validation slides (`val_auc`); the last epoch counts
  (training keeps the final weights); the probe's test AUC is recorded.
- `cdma`: the semi-supervised segmentation run (no supervised-only twin); tile Dice on the validation
  slides (`val_dice`), the best epoch counts (training keeps the best epoch's weights).

Test metrics are recorded, never used to choose. With `workers: 0` a trial runs the training loop itself
and reports every epoch (ASHA can stop it early); otherwise each trial is a Ray Train run that reports
once, at its end.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any

from slidestream.cluster.config import Config, WorkerResources, with_values
from slidestream.cluster.storage import exists, join, read_bytes
from slidestream.pipelines.features import FeatureBags
from slidestream.trainers.data import LabelledBags, TrainDataError
from slidestream.trainers.fit import fit_once, trains_in_process, worker_count
from slidestream.trainers.methods import METHODS, TUNABLE
from slidestream.trainers.mil.loop import train_fold
from slidestream.trainers.mil.runner import fit_job, make_job, resolve_mhim
from slidestream.trainers.session import RESULT_FILE, WEIGHTS_FILE
from slidestream.trainers.splits import FoldSplit, make_splits

__all__ = ["SweepTarget", "make_target"]


class SweepTarget(ABC):
    """One kind of sweep: its trial function and arguments, resources, and how trials are compared."""

    kind: str
    monitor: str
    mode = "max"
    keep = "best"  # the epoch of a trial that counts: "best" (its weights are kept) or "last"
    test_metric: str | None = None
    trial: Any  # the module-level trial function (Tune pickles it), as a staticmethod

    def __init__(self, config: Config) -> None:
        self.config = config

    @classmethod
    @abstractmethod
    def create(
        cls, kind: str, config: Config, out: str, features: str | None, labels: str | None
    ) -> SweepTarget:
        """The target of a `kind` sweep from the command's arguments (refused when it lacks one it needs)."""

    @property
    def resources(self) -> Any:
        """The method's config section (workers, cpus_per_worker, epochs): its row of the method table."""
        return getattr(self.config, METHODS[self.kind].section)

    @property
    def epochs(self) -> int:
        return int(self.resources.epochs)

    @property
    @abstractmethod
    def grace(self) -> int:
        """Epochs every trial trains before ASHA may stop it."""

    @abstractmethod
    def trial_arguments(self, sweep_dir: str) -> dict[str, Any]:
        """Keyword arguments of the trial function (may train what all trials share, e.g. a teacher)."""

    def test_value(self, sweep_dir: str, trial: str, counted: dict[str, Any]) -> float | None:
        """The recorded test metric of a trial, from the epoch that counts."""
        if self.test_metric is None or self.test_metric not in counted:
            return None
        return float(counted[self.test_metric])


def _bags_and_labels(kind: str, features: str | None, labels: str | None, what: str) -> tuple[str, str]:
    if not features or not labels:
        raise TrainDataError(f"tune {kind} needs --labels (for {what}) and feature bags")
    return features, labels


def _trial_context(params: dict[str, Any], base: dict[str, Any], trials_dir: str) -> tuple[Config, str]:
    """The trial's configuration and its own directory under the sweep."""
    import ray.tune

    config = with_values(Config.model_validate(base), params)
    return config, join(trials_dir, ray.tune.get_context().get_trial_id())


def _fit_in_trial(loop: Any, job_config: dict[str, Any], resources: WorkerResources, trial_dir: str,
                  result_uri: str, counted: Any) -> None:  # fmt: skip
    """Train in a trial: the loop itself (reporting each epoch to Tune) with 0 workers, else a Ray Train
    run whose `counted(result)` epoch is reported once it finished."""
    import ray.tune

    if trains_in_process(resources):
        loop({**job_config, "reporter": "tune"})
        return
    fit_once(loop, job_config, job_config["name"], resources, join(trial_dir, "ray"), result_uri)
    result = json.loads(read_bytes(result_uri))
    ray.tune.report({**counted(result), "epochs_trained": len(result["history"])})


# -- MIL / MHIM ---------------------------------------------------------------------------------------------


def _mil_best_epoch(result: dict[str, Any]) -> dict[str, Any]:
    return {**result["history"][result["metrics"]["best_epoch"]], "test_auc": result["metrics"]["auc"]}


def mil_trial(params: dict[str, Any], *, base: dict, data: LabelledBags, split: FoldSplit, kind: str,
              trials_dir: str, teacher_weights: str | None) -> None:  # fmt: skip
    config, trial_dir = _trial_context(params, base, trials_dir)
    extra: dict[str, Any] = {}
    if kind == "mhim":
        extra = {"mhim": resolve_mhim(config.train), "teacher_weights": teacher_weights}
    job = make_job(kind, split, data, config.train, trial_dir, **extra)
    result_uri = join(job.result_dir, RESULT_FILE)
    _fit_in_trial(train_fold, job.to_config(), config.train, trial_dir, result_uri, _mil_best_epoch)


class MILTarget(SweepTarget):
    trial, test_metric = staticmethod(mil_trial), "test_auc"

    @classmethod
    def create(
        cls, kind: str, config: Config, out: str, features: str | None, labels: str | None
    ) -> SweepTarget:
        features, labels = _bags_and_labels(kind, features, labels, "the MIL fold split")
        return cls(kind, config, features, labels)

    def __init__(self, kind: str, config: Config, features: str, labels: str) -> None:
        super().__init__(config)
        self.kind = kind
        train = config.train
        self.data = LabelledBags.open(features, labels, train.classes)
        self.split = make_splits(self.data, train.folds, train.seeds[:1], train.val_frac, train.protocol)[0]
        self.monitor = train.monitor
        self.mode = "min" if self.monitor == "val_loss" else "max"

    @property
    def grace(self) -> int:
        return max(1, min(self.config.train.min_epochs, self.epochs))

    def trial_arguments(self, sweep_dir: str) -> dict[str, Any]:
        return {"data": self.data, "split": self.split, "kind": self.kind,
                "teacher_weights": self._teacher(sweep_dir)}  # fmt: skip

    def _teacher(self, sweep_dir: str) -> str | None:
        """For MHIM with teacher_init auto: the split's baseline, trained once for the whole sweep."""
        init = self.config.train.mhim.teacher_init
        if self.kind != "mhim" or init == "none":
            return None
        if init != "auto":
            return (
                init if init.endswith(".pt") else join(init, "jobs", f"mil-{self.split.name}", WEIGHTS_FILE)
            )
        job = make_job("mil", self.split, self.data, self.config.train, join(sweep_dir, "teacher"))
        fit_job(job, self.config.train, join(sweep_dir, "teacher", "ray"))
        return join(job.result_dir, WEIGHTS_FILE)

    def test_value(self, sweep_dir: str, trial: str, counted: dict[str, Any]) -> float | None:
        """A finished trial's test AUC with its best weights (trials stopped early have none)."""
        result_uri = join(sweep_dir, "trials", trial, f"{self.kind}-{self.split.name}", RESULT_FILE)
        if exists(result_uri):
            return float(json.loads(read_bytes(result_uri))["metrics"]["auc"])
        return super().test_value(sweep_dir, trial, counted)


# -- Giga-SSL -----------------------------------------------------------------------------------------------


def _last_epoch(result: dict[str, Any]) -> dict[str, Any]:
    return result["history"][-1]


def gigassl_trial(params: dict[str, Any], *, base: dict, views: str, slide_ids: list[str], in_dim: int,
                  probe: dict[str, Any], trials_dir: str) -> None:  # fmt: skip
    from slidestream.trainers.gigassl.train import GigaSSLJob, train_gigassl

    config, trial_dir = _trial_context(params, base, trials_dir)
    name = trial_dir.rsplit("/", 1)[-1]
    cfg = config.gigassl.model_dump(mode="json")
    job = GigaSSLJob(name, views, slide_ids, in_dim, trial_dir, cfg, probe=probe)
    result_uri = join(trial_dir, RESULT_FILE)
    _fit_in_trial(train_gigassl, asdict(job), config.gigassl, trial_dir, result_uri, _last_epoch)


class GigaSSLTarget(SweepTarget):
    kind, monitor, keep, test_metric = "gigassl", "val_auc", "last", "test_auc"
    trial = staticmethod(gigassl_trial)

    @classmethod
    def create(
        cls, kind: str, config: Config, out: str, features: str | None, labels: str | None
    ) -> SweepTarget:
        features, labels = _bags_and_labels(kind, features, labels, "the linear probe that compares trials")
        return cls(config, features, labels)

    def __init__(self, config: Config, views: str, labels: str) -> None:
        from slidestream.trainers.gigassl.train import global_batch, layer4_weights, tile_features_for

        super().__init__(config)
        layer4_weights(config.gigassl.init_weights)  # refused before any trial runs when unset
        if config.gigassl.epochs < 1:
            raise TrainDataError("gigassl.epochs=0 trains nothing: a sweep needs at least 1 epoch per trial")
        bags = FeatureBags(views, require_labels=False)
        self.views, self.slide_ids, self.in_dim = views, list(bags.slide_ids), bags.dim
        global_batch(len(self.slide_ids), config.gigassl.batch_size, worker_count(config.gigassl))
        # the probe embeds the slides' un-augmented tiles when their bags exist (as the export does)
        tiles = tile_features_for(views) or views
        train = config.train
        data = LabelledBags.open(tiles, labels, train.classes)
        unviewed = sorted(set(data.slide_ids) - set(self.slide_ids))
        if unviewed:
            names = ", ".join(unviewed[:5])
            raise TrainDataError(
                f"{len(unviewed)} labelled slide(s) have no Giga-SSL views in {views}: {names}"
            )
        split = make_splits(data, train.folds, train.seeds[:1], train.val_frac, train.protocol)[0]
        self.probe = {"features": tiles, "classes": data.classes, "targets": data.target_of(),
                      "train": split.train, "val": split.val, "test": split.test}  # fmt: skip

    @property
    def grace(self) -> int:
        return max(1, min(self.config.gigassl.warmup_epochs, self.epochs))

    def trial_arguments(self, sweep_dir: str) -> dict[str, Any]:
        return {"views": self.views, "slide_ids": self.slide_ids, "in_dim": self.in_dim, "probe": self.probe}


# -- CDMA ---------------------------------------------------------------------------------------------------


def _best_val_dice(result: dict[str, Any]) -> dict[str, Any]:
    return max(result["history"], key=lambda epoch: epoch["val_dice"])


def cdma_trial(params: dict[str, Any], *, base: dict, out: str, trials_dir: str) -> None:
    from slidestream.trainers.cdma.run import CDMARun, train_cdma

    config, trial_dir = _trial_context(params, base, trials_dir)
    job = CDMARun(trial_dir.rsplit("/", 1)[-1], out, config).jobs()[0]  # the semi-supervised run
    job.result_dir = trial_dir
    result_uri = join(trial_dir, RESULT_FILE)
    _fit_in_trial(train_cdma, job.to_config(), config.cdma, trial_dir, result_uri, _best_val_dice)


class CDMATarget(SweepTarget):
    kind, monitor = "cdma", "val_dice"
    trial = staticmethod(cdma_trial)

    @classmethod
    def create(
        cls, kind: str, config: Config, out: str, features: str | None, labels: str | None
    ) -> SweepTarget:
        return cls(config, out)

    def __init__(self, config: Config, out: str) -> None:
        from slidestream.trainers.cdma.run import CDMARun

        super().__init__(config)
        self.out = out
        split = CDMARun("sweep", out, config).split  # checks the tiles and annotations now
        if not split.val:
            raise TrainDataError("tune cdma compares trials by validation Dice: set cdma.val_slides ≥ 1")

    @property
    def grace(self) -> int:
        # the unsupervised terms switch on at unsup_start_epoch: compare trials after it
        return max(1, min(self.config.cdma.unsup_start_epoch + 1, self.epochs))

    def trial_arguments(self, sweep_dir: str) -> dict[str, Any]:
        return {"out": self.out}


def make_target(kind: str, config: Config, out: str, features: str | None, labels: str | None) -> SweepTarget:
    """The target of a `kind` sweep; `features` is the bag (mil, mhim) or view (gigassl) directory."""
    method = METHODS.get(kind)
    if method is None or method.tune_target is None:
        raise TrainDataError(f"tune supports {', '.join(TUNABLE)}, not {kind!r}")
    return method.target_class().create(kind, config, out, features, labels)
