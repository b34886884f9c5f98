"""Does CDMA learn? 12 tiny synthetic slides of the easy cohort (7 with tumour, tumour darker than normal
tissue), 10 % of the training pool labelled (one slide), the rest unlabelled; the light MTNet from random
initialisation, tiles of 64 px at 2 µm/px, one Ray Train worker with both CPUs (its torch runs two threads:
~1.8× faster per step than one on a quiet 2-core machine, but ~10× slower when other work shared the
cores; the tests run one at a time). Tumour Dice ≥ 0.8 per held-out slide and
a held-out negative slide free of tumour.

`cdma.weights: random` trains the encoder's BatchNorm (`cdma.encoder_bn: auto`; the official network's
frozen BatchNorm would keep the initial statistics, no normalisation).

The hard cohort (issue 23: tumour of normal colour, stain by site; the session's `hard_cohort`, 24 slides):
the light MTNet's encoder starts from `resnet18_64` pretrained on a disjoint synthetic cohort, with the
official frozen BatchNorm at a fifth of the official rate. Two slides are labelled (10 % of the pool), tumour
slides first and from two sites (`cdma.labelled_slides: foreground`, `cdma.sites`). The held-out slides'
pooled tumour Dice must reach 0.7, and every positive test slide 0.6: training seeds 0 / 1 / 2 scored 0.744 /
0.723 / 0.773 here (bench/RESULTS.md).
- Its positive test slides are from a third site. On this split CDMA scored 0.82 (supervised-only 0.78).
  With the default split (one tumour slide and one tumour-free one, both from site 2) it scored 0.33.
- Over three splits of another 24-slide cohort, tumour slides first (not spread by site) gave 0.75 ± 0.17.
  From random initialisation the hard cohort stays near Dice 0 in this budget. bench/cdma.py --learning
  --difficulty hard measures all of these (bench/RESULTS.md).
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from slidestream.cli import main
from slidestream.pipelines.synthetic import write_dataset
from slidestream.testing.cohort import EmbeddedCohort
from slidestream.testing.encoder import TEST_PRETRAIN, pretrained_encoder

SETTINGS = (
    "tiling.mpp=2.0",
    "tiling.tile_px=64",
    "ray.num_cpus=2",
    "cdma.network=light",
    "cdma.labelled_frac=0.1",
    "cdma.workers=1",
    "cdma.cpus_per_worker=2",
    "cdma.supervised_baseline=false",
)
EASY = ("cdma.weights=random", "cdma.epochs=10", "cdma.unsup_start_epoch=6", "cdma.steps_per_epoch=8")
# the pretrained encoder keeps its BatchNorm statistics (`auto` → frozen) at a fifth of the official rate
# (at 1e-3 the decoders often fall into predicting no tumour); tumour slides labelled first, one site each.
# It trains in the test's own process (`cdma.workers=0`): the same Dice, epoch for epoch, as one Ray Train
# worker with both CPUs, in 112 s of training instead of 147 s (the easy cohort's test trains on Ray Train)
# Five supervised epochs, then three with the unsupervised terms: at ten epochs the evaluated best-validation
# weights came from the supervised ones in training seeds 0-2, so cutting two epochs (~14 s each) changed no
# result (epochs 0-7 are drawn the same either way; bench/RESULTS.md)
HARD = ("cdma.epochs=8", "cdma.unsup_start_epoch=5", "cdma.milestones=[7]", "cdma.steps_per_epoch=40",
        "cdma.lr=2e-4", "cdma.labelled_slides=foreground", "cdma.workers=0")  # fmt: skip
# the light MTNet's encoder, pretrained like the session's `resnet10t_64` (tests/conftest.py)
CDMA_PRETRAIN = replace(TEST_PRETRAIN, encoder="resnet18_64")


@pytest.fixture(scope="module")
def easy_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cdma-learning-easy")
    write_dataset(str(root / "slides"), 12, seed=11, size="tiny", fmt="svs", positive_fraction=0.6)
    return root


def _train(out: Path, slides: Path, *extra: str) -> dict:
    overrides = [x for s in (*SETTINGS, *extra) for x in ("--set", s)]
    name = "cdma-learn"  # its own run name: the hard cohort's output is shared with other learning tests
    argv = ["train", "cdma", "--name", name, "--out", str(out), "--annotations", str(slides / "masks")]
    assert main([*argv, *overrides]) == 0
    metrics = json.loads((out / "runs" / name / "metrics.json").read_text())
    split = metrics["split"]
    assert len(split["unlabelled"]) >= 8  # 10 % of the pool labelled, the rest not
    epochs = metrics["runs"]["cdma"]["history"]
    first_unsupervised = next(i for i, epoch in enumerate(epochs) if "loss_kd" in epoch)
    assert first_unsupervised >= 5 and "loss_kd" in epochs[-1]  # semi-supervised after a supervised start
    return metrics


def _held_out(slides: Path, metrics: dict) -> tuple[list[str], list[str]]:
    with (slides / "labels.csv").open() as handle:
        has_tumour = {row["slide_id"]: row["label"] == "1" for row in csv.DictReader(handle)}
    test = metrics["split"]["test"]
    positive = [s for s in test if has_tumour[s]]
    negative = [s for s in test if not has_tumour[s]]
    assert positive and negative, f"the split should hold out both kinds of slide: {test}"
    return positive, negative


def test_cdma_easy_cohort_reaches_tumour_dice_0_8(ray_local, easy_slides: Path) -> None:
    slides, out = easy_slides / "slides", easy_slides / "out"
    ingest = ["ingest", "--slides", str(slides), "--out", str(out)]
    assert main([*ingest, *(x for s in SETTINGS for x in ("--set", s))]) == 0
    metrics = _train(out, slides, *EASY)
    assert len(metrics["split"]["labelled"]) == 1
    positive, negative = _held_out(slides, metrics)
    rows = {row["slide_id"]: row for row in metrics["runs"]["cdma"]["slides"]}
    assert set(rows) == set(metrics["split"]["test"])
    dice = {slide: round(rows[slide]["dice_tumour"], 3) for slide in positive}
    assert min(dice.values()) >= 0.8, f"tumour Dice per held-out slide: {dice}"
    for slide in negative:  # no tumour in the truth and none predicted: Dice 1 by convention
        assert rows[slide]["dice_tumour"] == pytest.approx(1.0), f"{slide}: tumour predicted, none there"
    history = metrics["runs"]["cdma"]["history"]
    # the unsupervised terms do not undo what was learnt: the last epoch still segments validation tumour
    assert history[-1]["val_dice"] >= 0.8, [round(h["val_dice"], 3) for h in history]


def test_cdma_hard_cohort_with_a_pretrained_encoder_reaches_tumour_dice_0_7(
    ray_local, hard_cohort: EmbeddedCohort, tmp_path_factory: pytest.TempPathFactory, capsys
) -> None:
    weights = pretrained_encoder(tmp_path_factory.mktemp("cdma-encoder"), CDMA_PRETRAIN)
    slides, out = Path(hard_cohort.labels).parent, Path(hard_cohort.out)  # tiles already ingested
    metrics = _train(out, slides, *HARD, f"cdma.weights={weights}", f"cdma.sites={hard_cohort.labels}")
    with (slides / "labels.csv").open() as handle:
        rows = {row["slide_id"]: row for row in csv.DictReader(handle)}
    labelled = metrics["split"]["labelled"]
    assert len(labelled) == 2 and all(rows[s]["label"] == "1" for s in labelled), labelled  # tumour first
    assert len({rows[s]["site"] for s in labelled}) == 2, labelled  # and from two sites
    positive, _ = _held_out(slides, metrics)
    result = metrics["runs"]["cdma"]
    pooled = result["pooled"]["dice_tumour"]
    per_slide = {row["slide_id"]: round(row["dice_tumour"], 3) for row in result["slides"]}
    with capsys.disabled():
        print(f"\nCDMA, hard cohort, pretrained encoder: pooled tumour Dice {pooled:.3f}; {per_slide}")
    assert pooled >= 0.7, f"pooled tumour Dice {pooled:.3f} over the held-out slides {per_slide}"
    assert min(per_slide[s] for s in positive) >= 0.6, per_slide
