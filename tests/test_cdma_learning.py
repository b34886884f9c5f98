"""Does CDMA learn? 12 synthetic slides (7 with tumour), 10 % of the training pool labelled (one slide),
the rest unlabelled; the light MTNet from random initialisation at the default learning rate, with the
unsupervised terms from epoch 6 of 10. The tumour Dice of slide inference on the held-out slides must
reach 0.8, and a held-out slide without tumour must stay free of predicted tumour."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from slidestream.cli import main
from slidestream.pipelines.synthetic import write_dataset

SETTINGS = (
    "tiling.mpp=2.0",
    "tiling.tile_px=64",
    "ray.num_cpus=2",
    "cdma.network=light",
    "cdma.weights=random",
    "cdma.labelled_frac=0.1",
    "cdma.epochs=10",
    "cdma.unsup_start_epoch=6",
    "cdma.steps_per_epoch=8",
    "cdma.supervised_baseline=false",
    "cdma.workers=0",
)


@pytest.fixture(scope="module")
def twelve_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cdma-learning")
    write_dataset(str(root / "slides"), 12, seed=11, size="tiny", fmt="svs", positive_fraction=0.6)
    return root


def test_cdma_with_ten_percent_labelled_reaches_tumour_dice_0_8(ray_local, twelve_slides: Path) -> None:
    slides, out = twelve_slides / "slides", twelve_slides / "out"
    overrides = [x for s in SETTINGS for x in ("--set", s)]
    assert main(["ingest", "--slides", str(slides), "--out", str(out), *overrides]) == 0
    argv = ["train", "cdma", "--name", "learn", "--out", str(out), "--annotations", str(slides / "masks")]
    assert main([*argv, *overrides]) == 0

    metrics = json.loads((out / "runs" / "learn" / "metrics.json").read_text())
    split = metrics["split"]
    assert len(split["labelled"]) == 1 and len(split["unlabelled"]) >= 8  # 10 % of the pool
    with (slides / "labels.csv").open() as handle:
        has_tumour = {row["slide_id"]: row["label"] == "1" for row in csv.DictReader(handle)}
    rows = {row["slide_id"]: row for row in metrics["runs"]["cdma"]["slides"]}
    assert set(rows) == set(split["test"])
    positive = [slide for slide in rows if has_tumour[slide]]
    negative = [slide for slide in rows if not has_tumour[slide]]
    assert positive and negative, f"the split should hold out both kinds of slide: {split['test']}"
    dice = {slide: round(rows[slide]["dice_tumour"], 3) for slide in positive}
    assert min(dice.values()) >= 0.8, f"tumour Dice per held-out slide: {dice}"
    for slide in negative:  # no tumour in the truth and none predicted: Dice 1 by convention
        assert rows[slide]["dice_tumour"] == pytest.approx(1.0), f"{slide}: tumour predicted, none there"
    history = metrics["runs"]["cdma"]["history"]
    assert "loss_kd" in history[-1] and "loss_kd" not in history[5]  # semi-supervised from epoch 6 on
    # the unsupervised terms do not undo what was learnt: the last epoch still segments validation tumour
    assert history[-1]["val_dice"] >= 0.8, [round(h["val_dice"], 3) for h in history]
