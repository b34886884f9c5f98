"""A hard synthetic cohort taken through our own pipeline for the Giga-SSL learning test and benchmarks:
slides → tiles (64 px at 2 µm/px, the pretrained `resnet10t_64`'s scale) → un-augmented tile features and
Giga-SSL views, from the pretrained encoder and (optionally) from the same network at random weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slidestream.cluster.config import Config
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import join
from slidestream.pipelines.embed import EmbedStage, run_embed
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.stream import IngestReport
from slidestream.pipelines.synthetic import HARD_TUMOUR_COVER, write_dataset
from slidestream.testing.helpers import make_config

ENCODER = "resnet10t_64"
# the pretrained encoder's scale: 64-px tiles at 2 µm/px, embedded at their native size
PIPELINE = ("tiling.mpp=2.0", "tiling.tile_px=64", "embed.dtype=float32")


@dataclass
class EmbeddedCohort:
    out: str  # the pipeline's output root (runs go under OUT/runs)
    labels: str  # labels.csv: slide_id,label,patient_id,site
    features: dict[str, str] = field(default_factory=dict)  # weights ("pretrained" / "random") → tile bags
    views: dict[str, str] = field(default_factory=dict)  # weights → Giga-SSL view bags


def embedded_cohort(
    root: Path,
    n_slides: int,
    weights: Path,
    seed: int,
    views: tuple[int, int] | None = (8, 32),
    tumour_cover: tuple[float, float] = HARD_TUMOUR_COVER,
    random_too: bool = False,
    config: Config | None = None,
) -> EmbeddedCohort:
    """`n_slides` tiny hard slides (`seed`; half with tumour covering `tumour_cover` of the tissue) under
    root/slides, ingested into root/out with the pretrained `weights`' features and `views` (NAUG, NT)
    Giga-SSL views (None: no views); with `random_too` also features and views of the same network at
    random weights."""
    config = config or make_config(*PIPELINE)
    slides, out = root / "slides", root / "out"
    if not (slides / "labels.csv").exists():
        write_dataset(str(slides), n_slides, seed=seed, size="tiny", fmt="svs", difficulty="hard",
                      tumour_cover=tumour_cover)  # fmt: skip
    ensure_ray(config.ray)
    cohort = EmbeddedCohort(str(out), str(slides / "labels.csv"))
    for name, source in (("pretrained", str(weights)), *((("random", "random"),) if random_too else ())):
        features = EmbedStage(ENCODER, source, config.tiling, config.embed)
        if name == "pretrained":  # tiles and the first features in one pass; every slide must get through
            report = run_ingest(str(slides), str(out), config, embed=features)
        else:
            report = run_embed(str(out), config, features)
        _check_all_done(name, n_slides, report)
        cohort.features[name] = join(str(out), features.stage)
        if views is not None:
            view_stage = EmbedStage(ENCODER, source, config.tiling, config.embed, views=views)
            _check_all_done(f"{name} views", n_slides, run_embed(str(out), config, view_stage))
            cohort.views[name] = join(str(out), view_stage.stage)
    return cohort


def _check_all_done(name: str, n_slides: int, report: IngestReport) -> None:
    """Every slide must get through (a rerun skips what is done)."""
    if report.failed or len(report.ok) + report.skipped_unchanged != n_slides:
        raise RuntimeError(f"{name}: {report.summary()}")
