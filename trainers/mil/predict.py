"""Apply a trained run to feature bags: per-slide class probabilities (the mean over the run's fold
models) and, on request, attention heatmaps over the slide thumbnails."""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from slidestream.cluster.storage import exists, join, read_bytes, write_bytes_atomic
from slidestream.pipelines.features import FeatureBags
from slidestream.pipelines.formats.errors import SlideError
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.slides import discover_slides
from slidestream.trainers.data import TrainDataError
from slidestream.trainers.fit import RUN_FILE
from slidestream.trainers.models import build_model
from slidestream.trainers.models.base import MILModel
from slidestream.trainers.session import RESULT_FILE, WEIGHTS_FILE, load_weights

__all__ = ["PredictReport", "load_run_models", "predict_run", "predict_table", "write_table"]

log = logging.getLogger(__name__)


@dataclass
class PredictReport:
    predictions: str  # URI of the predictions Parquet file
    n_slides: int
    heatmaps: list[str]
    heatmap_failures: dict[str, str]


def load_run_models(run_dir: str) -> tuple[dict, list[MILModel]]:
    """The run plan and one eval-mode model per finished fold of the run's own kind."""
    try:
        plan = json.loads(read_bytes(join(run_dir, RUN_FILE)))
    except FileNotFoundError:
        raise TrainDataError(f"{run_dir} is not a training run (no {RUN_FILE})") from None
    kind = plan["kind"]
    models = []
    for split in plan["splits"]:
        job_dir = join(run_dir, "jobs", f"{kind}-s{split['seed']}-f{split['fold']}")
        if not exists(join(job_dir, RESULT_FILE)):
            raise TrainDataError(f"run {run_dir} is unfinished: {job_dir} has no {RESULT_FILE} (rerun train)")
        train = plan["train"]
        model = build_model(train["model"], plan["dim"], len(plan["classes"]), **train["model_options"])
        model.load_state_dict(load_weights(join(job_dir, WEIGHTS_FILE)))
        models.append(model.eval())
    return plan, models


def _slide_uris(features: str, slides: str | None) -> dict[str, str]:
    """slide_id → slide URI, from `--slides` (prefix or CSV) or the ledger beside the features."""
    if slides:
        return {s.slide_id: s.uri for s in discover_slides(slides, (".svs", ".tif", ".tiff", ".ndpi")).slides}
    root = features.rstrip("/")
    stage_dir, key = os.path.split(root)
    out, features_dirname = os.path.split(stage_dir)
    if features_dirname != "features":
        return {}
    return {e.slide_id: e.uri for e in Ledger(out).entries(f"features/{key}") if e.status == "ok"}


def predict_run(
    run_dir: str,
    features: str,
    *,
    output: str | None = None,
    heatmaps: bool = False,
    slides: str | None = None,
) -> PredictReport:
    """Predict every bag in `features` with the run's models; write predictions (and heatmaps)."""
    output = output or join(run_dir, "predict")
    table, written, failures = predict_table(
        run_dir, features, heatmaps_dir=join(output, "heatmaps") if heatmaps else None, slides=slides
    )
    predictions = join(output, "predictions.parquet")
    write_table(predictions, table)
    return PredictReport(predictions, table.num_rows, written, failures)


def write_table(uri: str, table: pa.Table) -> None:
    """One Parquet object, written atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(uri, buffer.getvalue())


@torch.no_grad()
def predict_table(
    run_dir: str,
    features: str,
    *,
    slide_ids: list[str] | None = None,
    heatmaps_dir: str | None = None,
    slides: str | None = None,
) -> tuple[pa.Table, list[str], dict[str, str]]:
    """Predictions of the bags in `features` (all, or `slide_ids`) as a table `slide_id, prediction,
    prob_<class>…`; with `heatmaps_dir`, a heatmap PNG per slide there. Returns the table, the heatmaps
    written and the heatmaps skipped (slide → reason)."""
    plan, models = load_run_models(run_dir)
    bags = FeatureBags(features)
    if bags.dim != plan["dim"]:
        raise TrainDataError(
            f"features in {features} are {bags.dim}-d but run {run_dir} was trained on {plan['dim']}-d"
        )
    classes = plan["classes"]
    uris = _slide_uris(features, slides) if heatmaps_dir else {}
    rows: dict[str, list] = {"slide_id": [], "prediction": [], **{f"prob_{c}": [] for c in classes}}
    written: list[str] = []
    failures: dict[str, str] = {}
    for slide_id in bags.slide_ids if slide_ids is None else slide_ids:
        bag = bags.load(slide_id)
        outs = [m(bag.features) for m in models]
        probs = (
            torch.stack([m.probabilities(o)[0] for m, o in zip(models, outs, strict=True)]).mean(0).numpy()
        )
        rows["slide_id"].append(slide_id)
        rows["prediction"].append(classes[int(np.argmax(probs))])
        for c, name in enumerate(classes):
            rows[f"prob_{name}"].append(float(probs[c]))
        if heatmaps_dir:
            scores = torch.stack([m.heatmap_scores(o) for m, o in zip(models, outs, strict=True)]).mean(0)
            target = join(heatmaps_dir, f"{slide_id}.png")
            try:
                _heatmap(slide_id, uris, bags, bag.coords.numpy(), scores.numpy(), target, probs, classes)
                written.append(target)
            except (SlideError, TrainDataError, OSError) as exc:
                failures[slide_id] = str(exc)
                log.warning("heatmap for slide %s skipped: %s", slide_id, exc)
    return pa.table(rows), written, failures


def _heatmap(
    slide_id: str,
    uris: dict[str, str],
    bags: FeatureBags,
    coords: np.ndarray,
    scores: np.ndarray,
    target: str,
    probs: np.ndarray,
    classes: list[str],
) -> None:
    from slidestream.trainers.viz import slide_heatmap

    if slide_id not in uris:
        raise TrainDataError(f"slide {slide_id}: no slide file known (pass --slides)")
    meta = bags.meta(slide_id)
    if meta is None or meta.mpp is None or meta.tile_px is None:
        raise TrainDataError(f"slide {slide_id}: its bag does not record mpp and tile_px")
    title = f"{slide_id}  " + "  ".join(f"p({c})={p:.2f}" for c, p in zip(classes, probs, strict=True))
    slide_heatmap(uris[slide_id], coords, scores, meta.tile_px, meta.mpp, target, title=title)
