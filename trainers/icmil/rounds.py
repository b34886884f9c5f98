"""ICMIL (iteratively coupled MIL): the bag classifier and the tile embedder trained in turns.

Round 0: `embed` every slide with the starting encoder → `mil`: train the bag classifier (the MIL
trainer) on frozen features. Round r ≥ 1: `distill`: fine-tune the embedder from the frozen bag classifier
of round r − 1 (`trainers/icmil/finetune.py`, Ray Train) → `embed` every slide again with the new weights,
under a new encoder key (the key holds the weights' digest) → `mil`: retrain the bag classifier.

One split per run: seed `train.seeds[0]`, fold `icmil.fold` of the MIL trainer's fold plan. Every round
trains, selects and tests on the same parts, so the rounds' test metrics compare like with like; the
fine-tuning streams tiles of the training part only.

Layout of `OUT/runs/NAME/`: `run.json` (the settings: a rerun with other settings is refused),
`round-<r>/manifest.json` (the round's finished steps and what they produced), `round-<r>/distill/`
(`encoder.pt`, `result.json`), `round-<r>/mil/` (an MIL run of the one split), `ray/` (Ray Train storage
of the fine-tunings), and `metrics.json` (a row per round) + `rounds.png`. A rerun of the same name
skips finished steps and resumes the unfinished one (embed: committed bags are kept; MIL and fine-tuning:
from their last epoch checkpoint); a rerun with more `--rounds` continues from the last round.
Encoder weights are files the embed actors open by path, so OUT must be a local or shared directory.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from slidestream.cluster.config import Config
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import exists, is_local, join, read_bytes, write_bytes_atomic
from slidestream.pipelines.embed import EmbedStage, run_embed
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.tile_store import committed_tiles, shard_uris
from slidestream.trainers.data import TrainDataError
from slidestream.trainers.fit import RESOURCE_KEYS, TrainingError, fit_loop, write_or_check_plan
from slidestream.trainers.icmil.distill import check_model
from slidestream.trainers.icmil.finetune import ENCODER_FILE, RESULT_FILE, DistillJob, finetune_embedder
from slidestream.trainers.methods import TrainRequest
from slidestream.trainers.mil.runner import Run
from slidestream.trainers.session import WEIGHTS_FILE

__all__ = ["ICMILError", "ICMILRun", "ICMILSummary", "format_rounds", "run_icmil"]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_TABLE_KEYS = ("auc", "acc", "f1")


class ICMILError(TrainingError):
    """A round step that could not finish; the message names the round, the step and why."""


@dataclass
class ICMILSummary:
    run_dir: str
    metrics: dict[str, Any]


def round_steps(r: int) -> tuple[str, ...]:
    return ("embed", "mil") if r == 0 else ("distill", "embed", "mil")


def _read_json(uri: str) -> dict[str, Any] | None:
    return json.loads(read_bytes(uri)) if exists(uri) else None


def _write_json(uri: str, value: dict[str, Any]) -> None:
    write_bytes_atomic(uri, json.dumps(value, indent=1).encode())


def _slides(split: dict[str, Any]) -> set[str]:
    return {s for part in ("train", "val", "test") for s in split[part]}


class ICMILRun:
    """One named ICMIL run under an output root."""

    def __init__(
        self, name: str, out: str, labels: str, encoder: str, weights: str, config: Config, rounds: int
    ) -> None:
        if not name or any(c in name for c in "/\\") or name.startswith("."):
            raise TrainDataError(f"--name must be a plain name (no slashes), got {name!r}")
        if rounds < 0:
            raise TrainDataError(f"--rounds must be ≥ 0, got {rounds}")
        if not is_local(out):
            raise TrainDataError(
                f"train icmil: OUT must be a local or shared directory (the embed stage opens each round's "
                f"encoder weights by path), got {out}"
            )
        check_model(config.train.model)
        from slidestream.pipelines.encoders import encoder_info

        encoder_info(encoder, weights, config.embed.seed)  # a bad encoder name or weights file fails here
        self.name, self.out, self.labels = name, out, labels
        self.encoder, self.weights, self.config, self.rounds = encoder, weights, config, rounds
        self.run_dir = join(out, "runs", name)

    # -- settings and state -------------------------------------------------------------------------------

    def plan(self) -> dict[str, Any]:
        without = lambda d: {k: v for k, v in d.items() if k not in RESOURCE_KEYS}  # noqa: E731
        return {
            "kind": "icmil",
            "labels": self.labels,
            "encoder": self.encoder,
            "weights": self.weights,
            "tiling": self.config.tiling.key,
            "embed": {"seed": self.config.embed.seed, "input_px": self.config.embed.input_px},
            "train": without(self.config.train.model_dump(mode="json")),
            "icmil": without(self.config.icmil.model_dump(mode="json")),
        }

    def _write_or_check_plan(self) -> None:
        if write_or_check_plan(self.run_dir, self.name, self.plan(), self.config):
            log.info("ICMIL run %s exists: resuming (finished steps are kept)", self.name)

    def round_dir(self, r: int) -> str:
        return join(self.run_dir, f"round-{r}")

    def manifest(self, r: int) -> dict[str, Any]:
        return _read_json(join(self.round_dir(r), MANIFEST)) or {}

    def _record(self, r: int, step: str, info: dict[str, Any]) -> None:
        manifest = self.manifest(r)
        manifest[step] = info
        _write_json(join(self.round_dir(r), MANIFEST), manifest)

    # -- steps --------------------------------------------------------------------------------------------

    def _embed(self, r: int) -> dict[str, Any]:
        weights = self.weights if r == 0 else self.manifest(r)["distill"]["weights"]
        stage = EmbedStage(self.encoder, weights, self.config.tiling, self.config.embed)
        report = run_embed(self.out, self.config, stage)
        if report.failed:
            detail = ", ".join(f"{s} ({e})" for s, e in list(report.failed.items())[:5])
            raise ICMILError(f"round {r} embed: {len(report.failed)} slide(s) failed: {detail}")
        print(f"round {r} embed: {len(report.ok)} slides embedded → {join(self.out, stage.stage)}")
        return {"weights": weights, "encoder_key": stage.info.key, "features": join(self.out, stage.stage)}

    def _mil(self, r: int) -> dict[str, Any]:
        features = self.manifest(r)["embed"]["features"]
        run = Run("mil", self.name, self.out, features, self.labels, self.config,
                  run_dir=join(self.round_dir(r), "mil"), fold=self.config.icmil.fold)  # fmt: skip
        split = run.splits[0].to_dict()
        if r > 0 and split != (first := self.manifest(0)["mil"]["split"]):
            moved = sorted(_slides(first) ^ _slides(split))
            raise ICMILError(
                f"round {r} mil: the split differs from round 0's (slides in one round only: {moved[:5]}); "
                "every round must train and test on the same slides"
            )
        summary = run.execute()
        weights = join(run.run_dir, "jobs", f"mil-{run.splits[0].name}", WEIGHTS_FILE)
        row = summary.metrics["folds"][0]
        print(f"round {r} mil: test " + "  ".join(f"{k} {row[k]:.4f}" for k in _TABLE_KEYS if k in row))
        return {"metrics": row, "weights": weights, "split": split, "dim": run.data.dim,
                "classes": run.data.classes}  # fmt: skip

    def distill_job(self, r: int) -> DistillJob:
        """Round r's fine-tuning: the previous round's encoder and bag classifier, the tiles of the
        split's training slides (validation slides only score epochs; test slides are never read)."""
        prev, split = self.manifest(r - 1), self.manifest(0)["mil"]["split"]
        tiling = self.config.tiling
        committed = committed_tiles(Ledger(self.out), tiling)
        shards = {sid: shard_uris(self.out, tiling, entry) for sid, entry in committed.items()}
        if missing := [s for s in split["train"] if s not in shards]:
            raise ICMILError(f"round {r} distill: training slides without committed tiles: {missing[:5]}")
        icmil, train = self.config.icmil, self.config.train
        return DistillJob(
            name=f"distill-r{r}", encoder=self.encoder, encoder_weights=prev["embed"]["weights"],
            encoder_seed=self.config.embed.seed, input_px=self.config.embed.input_px, model=train.model,
            model_options=train.model_options, mil_weights=prev["mil"]["weights"], dim=prev["mil"]["dim"],
            n_classes=len(prev["mil"]["classes"]),
            train_shards=[u for s in split["train"] for u in shards[s]],
            val_shards=[u for s in split["val"] for u in shards.get(s, [])],
            train_tiles=sum(committed[s].n_tiles for s in split["train"]),
            result_dir=join(self.round_dir(r), "distill"),
            icmil=icmil.model_dump(mode="json"), seed=split["seed"],
        )  # fmt: skip

    def _distill(self, r: int) -> dict[str, Any]:
        job, icmil = self.distill_job(r), self.config.icmil
        result_uri = join(job.result_dir, RESULT_FILE)
        if _read_json(result_uri) is None:
            fit_loop(finetune_embedder, job.to_config(), job.name, icmil, join(self.run_dir, "ray"))
        result = _read_json(result_uri)
        if result is None:
            raise ICMILError(f"round {r} distill: fine-tuning ended without writing {RESULT_FILE}")
        speeds = [h["tiles_per_s"] for h in result["history"] if math.isfinite(h["tiles_per_s"])]
        info = {
            "weights": join(job.result_dir, ENCODER_FILE),
            "best_epoch": result["best_epoch"],
            "val_mae": result["val_mae"],
            "tiles_per_s": sum(speeds) / len(speeds) if speeds else math.nan,
            "workers": icmil.workers,
        }
        print(f"round {r} distill: val MAE {info['val_mae']:.5f} (epoch {info['best_epoch']}), "
              f"{info['tiles_per_s']:.1f} tiles/s")  # fmt: skip
        return info

    # -- the run ------------------------------------------------------------------------------------------

    def execute(self) -> ICMILSummary:
        ensure_ray(self.config.ray)
        self._write_or_check_plan()
        steps = {"distill": self._distill, "embed": self._embed, "mil": self._mil}
        for r in range(self.rounds + 1):
            for step in round_steps(r):
                if step in self.manifest(r):
                    log.info("round %d %s: done earlier, skipped", r, step)
                    continue
                try:
                    info = steps[step](r)
                except (ICMILError, TrainDataError):
                    raise
                except Exception as exc:
                    raise ICMILError(f"round {r} {step}: {exc}; rerun to resume at this step") from exc
                self._record(r, step, info)
        return self._collect()

    def _collect(self) -> ICMILSummary:
        rows = []
        for r in range(self.rounds + 1):
            manifest = self.manifest(r)
            row = {"round": r, "encoder_key": manifest["embed"]["encoder_key"], **manifest["mil"]["metrics"]}
            if "distill" in manifest:
                row.update({f"distill_{k}": manifest["distill"][k] for k in ("val_mae", "tiles_per_s")})
            rows.append(row)
        first = self.manifest(0)["mil"]
        metrics = {
            "kind": "icmil",
            "model": self.config.train.model,
            "encoder": self.encoder,
            "classes": first["classes"],
            "seed": first["split"]["seed"],
            "fold": first["split"]["fold"],
            "rounds": rows,
        }
        from slidestream.trainers.viz import round_metrics

        round_metrics(rows, [k for k in _TABLE_KEYS if k in rows[0]], join(self.run_dir, "rounds.png"))
        _write_json(join(self.run_dir, "metrics.json"), metrics)
        return ICMILSummary(self.run_dir, metrics)


def format_rounds(metrics: dict[str, Any]) -> str:
    """The rounds side by side, as `slidestream train icmil` prints them."""
    keys = [k for k in _TABLE_KEYS if k in metrics["rounds"][0]]
    lines = [f"{'round':>5} " + " ".join(f"{k:>8}" for k in keys) + "  encoder key"]
    for row in metrics["rounds"]:
        cells = " ".join(f"{row[k]:>8.4f}" for k in keys)
        lines.append(f"{row['round']:>5} {cells}  {row['encoder_key']}")
    return "\n".join(lines)


def run_icmil(request: TrainRequest, config: Config) -> dict[str, Any]:
    """`slidestream train icmil` (the method table's entry): the metrics that `format_rounds` prints."""
    assert request.labels and request.encoder and request.weights  # the command line made sure of them
    print(
        f"train icmil: {config.train.model} ⇄ {request.encoder}, {request.rounds} round(s) "
        f"→ {request.run_dir}"
    )
    run = ICMILRun(
        request.name, request.out, request.labels, request.encoder, request.weights, config, request.rounds
    )
    return run.execute().metrics
