"""ICMIL learns on a hard cohort (issue 23): one round on the session's hard slides (`hard_cohort`: stain
by site, tumour of normal tissue's colour, 10-30 % cover), embedded by the pretrained `resnet10t_64`. The
fine-tuning is a real 2-worker Ray Train run; the bag classifier is ABMIL on fold 0 of 3 (8 test slides).

Asserted, as issue 23 asks: round 1 (the embedder fine-tuned by the round-0 classifier) is not worse than
round 0 on the held-out slides, the distillation moves the embedder (new features under a new key) and
the teacher-student KL falls over the fine-tuning epochs. Measured here on a quiet machine: AUC 0.375 →
0.688, KL 0.160 → 0.094 → 0.074, 47 s. This split is one draw: over 6 (seed, fold) parts of a 30-slide
cohort round 1 ≥ round 0 held in 3 (bench/icmil_gain.py, bench/RESULTS.md), so the paper's gain is not
claimed from this test; the falling KL held in every part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from slidestream.cli import main
from slidestream.testing.cohort import PIPELINE, EmbeddedCohort

SETTINGS = (
    *PIPELINE, "train.model=abmil", "train.workers=0", "train.parallel_folds=1", "train.folds=3",
    "train.epochs=30", "icmil.workers=2", "icmil.cpus_per_worker=1", "icmil.epochs=3",
    "icmil.tiles_per_epoch=512", "icmil.batch_size=32", "icmil.lr=0.0001", "icmil.val_tiles=256",
)  # fmt: skip


def _features(features_dir: str) -> dict[str, np.ndarray]:
    bags = {}
    for path in sorted(Path(features_dir).glob("*.parquet")):
        column = pq.read_table(path, columns=["feature"]).column("feature")
        bags[path.stem] = np.stack(column.to_numpy(zero_copy_only=False)).astype(np.float32)
    return bags


def test_round_one_is_not_worse_and_the_distillation_moves_the_embedder(
    hard_cohort: EmbeddedCohort, pretrained_weights: Path, capsys
):
    data = hard_cohort
    args = ["train", "icmil", "--name", "icmil-learn", "--out", data.out, "--labels", data.labels,
            "--encoder", "resnet10t_64", "--weights", str(pretrained_weights), "--rounds", "1"]  # fmt: skip
    for setting in SETTINGS:
        args += ["--set", setting]
    assert main(args) == 0
    run_dir = Path(data.out) / "runs" / "icmil-learn"
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    history = json.loads((run_dir / "round-1" / "distill" / "result.json").read_text())["history"]
    kl = [epoch["loss_c"] for epoch in history]
    with capsys.disabled():
        auc = f"round 0 {rounds[0]['auc']:.3f} → round 1 {rounds[1]['auc']:.3f}"
        print(f"\nICMIL learning test: test AUC {auc}; teacher-student KL by epoch {np.round(kl, 4)}")
    assert rounds[1]["auc"] >= rounds[0]["auc"], rounds
    assert len(kl) == 3 and kl[-1] < kl[0], kl

    manifests = [json.loads((run_dir / f"round-{r}" / "manifest.json").read_text()) for r in (0, 1)]
    before, after = (_features(m["embed"]["features"]) for m in manifests)
    assert manifests[0]["embed"]["encoder_key"] != manifests[1]["embed"]["encoder_key"]
    n_slides = len(Path(data.labels).read_text().splitlines()) - 1
    assert set(before) == set(after) and len(before) == n_slides
    for slide_id, features in before.items():
        moved = after[slide_id]
        assert features.shape == moved.shape and not np.allclose(features, moved), slide_id
