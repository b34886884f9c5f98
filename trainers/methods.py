"""The training methods in one table: the kinds `slidestream train` and `slidestream tune` offer, the
config section that holds each method's settings (where its --workers / --epochs go), what it is (the
command line's help), the trainer entry that runs it and how its result is printed, and for the kinds
that can be swept, the sweep target that compares their trials.

The command line and Tune read this table; nothing else lists the kinds. It imports nothing heavy: the
entries are "module:name" strings, imported when a run or a sweep starts.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any

from slidestream.cluster.storage import join

if TYPE_CHECKING:
    from slidestream.cluster.config import Config


@dataclass(frozen=True)
class TrainRequest:
    """What `slidestream train KIND` asks for besides the settings; each kind reads the fields it needs
    (`Method.needs` and `Method.features_under` say which the command line has made sure of)."""

    kind: str
    name: str
    out: str
    features: str | None = None  # --features as given
    feature_dir: str | None = None  # --features, else the only set under OUT/<Method.features_under>
    labels: str | None = None
    encoder: str | None = None
    weights: str | None = None
    rounds: int = 1
    export: bool = False

    @property
    def run_dir(self) -> str:
        return join(self.out, "runs", self.name)


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Method:
    """One row of the table: a kind of `slidestream train`, its settings in the order `train` uses them."""

    kind: str
    section: str  # the config section of its settings
    summary: str  # what `train KIND` does
    _: KW_ONLY
    needs: tuple[str, ...] = ()  # TrainRequest fields (flags of the same name) the kind cannot do without
    needs_note: str = ""  # said after those flags when one is missing
    features_under: str | None = None  # --features defaults to the only set under OUT/<this>; None: unused
    export: str | None = None  # "module:function" `--export` runs instead: (TrainRequest, Config) -> its line
    run: str  # "module:function" (TrainRequest, Config) -> result; it prints the line saying what starts
    report: str  # "module:function" result -> the summary printed after the run
    outputs: tuple[tuple[str, str], ...] = ()  # (what, file in the run directory) printed after the summary
    tune_target: str | None = None  # "module:class" of its sweep target; None: it cannot be swept
    tune_summary: str = ""  # what its trials are compared on
    recipe_section: str = ""  # the section whose `recipe` --recipe sets ("": `section`)

    @property
    def recipe_key(self) -> str:
        """The setting `--recipe` sets for this kind."""
        return f"{self.recipe_section or self.section}.recipe"

    def runner(self) -> Callable[[TrainRequest, Config], Any]:
        return _load(self.run)

    def reporter(self) -> Callable[[Any], str]:
        return _load(self.report)

    def exporter(self) -> Callable[[TrainRequest, Config], str] | None:
        """The entry of `train KIND --export`; None: the kind has none (the flag is ignored)."""
        return None if self.export is None else _load(self.export)

    def target_class(self) -> Any:
        """The sweep target class (imported here, on first use)."""
        if self.tune_target is None:
            raise KeyError(f"{self.kind} has no sweep target")
        return _load(self.tune_target)


_TARGETS = "slidestream.trainers.tune.targets"


def _mil(kind: str, summary: str) -> Method:
    """mil and mhim: one runner, table and sweep (the kind says whether the MHIM teacher takes part)."""
    runner = "slidestream.trainers.mil.runner"
    return Method(
        kind,
        "train",
        summary,
        needs=("labels",),
        features_under="features",
        run=f"{runner}:run_mil",
        report=f"{runner}:format_table",
        outputs=(
            ("metrics", "metrics.json"),
            ("predictions", "predictions.parquet"),
            ("curves", "curves.png"),
        ),
        tune_target=f"{_TARGETS}:MILTarget",
        tune_summary="validation loss or AUC of a fold split",
    )


METHODS: dict[str, Method] = {
    m.kind: m
    for m in (
        _mil("mil", "baseline MIL"),
        _mil("mhim", "MHIM-MIL"),
        Method(
            "icmil",
            "train",
            "bag classifier and tile embedder in turns",
            needs=("labels", "encoder", "weights"),
            needs_note="a local file, or 'random'",
            run="slidestream.trainers.icmil.rounds:run_icmil",
            report="slidestream.trainers.icmil.rounds:format_rounds",
            outputs=(("metrics", "metrics.json"), ("rounds", "rounds.png")),
            recipe_section="icmil",
        ),
        Method(
            "cdma",
            "cdma",
            "semi-supervised tissue segmentation on the tile shards",
            run="slidestream.trainers.cdma.run:run_cdma",
            report="slidestream.trainers.cdma.run:format_cdma_table",
            outputs=(("metrics", "metrics.json"), ("slide masks, overlays, GeoJSON", "slides")),
            tune_target=f"{_TARGETS}:CDMATarget",
            tune_summary="validation-slide Dice",
        ),
        Method(
            "gigassl",
            "gigassl",
            "self-supervised slide embeddings from Giga-SSL views (--features: the views, default the only "
            "set under OUT/gigassl)",
            features_under="gigassl",
            export="slidestream.trainers.gigassl.train:export_run",
            run="slidestream.trainers.gigassl.train:run_gigassl",
            report="slidestream.trainers.gigassl.train:format_gigassl",
            outputs=(("curves", "curves.png"),),
            tune_target=f"{_TARGETS}:GigaSSLTarget",
            tune_summary="validation AUC of a linear probe of the slide embeddings after every epoch",
        ),
    )
}
TUNABLE = [kind for kind, method in METHODS.items() if method.tune_target is not None]
