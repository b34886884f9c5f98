"""`slidestream demo` end to end, as a newcomer runs it: synthetic slides → tiles + features → baseline
ABMIL and MHIM-ABMIL per fold → metrics, predictions, curves and heatmaps. It is also the learning test:
on synthetic slides both reach AUC ≥ 0.9 (cross-validated, test folds never used for selection)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from slidestream.testing.helpers import ray_internal_lines

pytestmark = pytest.mark.slow
DEMO = [sys.executable, "-m", "slidestream.cli", "demo"]


def test_demo_trains_mhim_abmil_and_draws_heatmaps(tmp_path: Path, s3_server):
    out = tmp_path / "demo"
    env = {**os.environ, "SLIDESTREAM_PROGRESS": "0"}
    done = subprocess.run(
        # The newcomer's command, lighter: 256-px tiles (a quarter of the tiles to embed and train on), and
        # each fold trained inside its Ray task (Ray Train's local mode, `train.workers=0`) instead of on a
        # Ray Train worker group, whose start-up costs more than these trainings themselves. Worker groups,
        # their failures and resumption are tested in test_mil_training.py.
        [*DEMO, "--out", str(out), "--set", "tiling.tile_px=256", "--set", "train.workers=0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "24 slides: 24 ok, 0 failed" in done.stdout
    assert "mean ± std" in done.stdout and "heatmaps: 24 written, 0 skipped" in done.stdout
    console = done.stdout + done.stderr
    assert not ray_internal_lines(console), ray_internal_lines(console)  # Ray's chatter: in OUT/logs/
    assert next((out / "logs").glob("demo-*.log")).stat().st_size > 0

    run = out / "runs" / "demo-mhim-abmil"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["kind"] == "mhim" and len(metrics["folds"]) == 2
    assert metrics["mean"]["auc"] >= 0.9, metrics["folds"]
    assert metrics["baseline"]["mean"]["auc"] >= 0.9, metrics["baseline"]["folds"]
    for png in [run / "curves.png", *sorted((run / "predict" / "heatmaps").glob("*.png"))[:3]]:
        with Image.open(png) as image:
            assert image.width > 300 and image.height > 200, png
