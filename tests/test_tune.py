"""Ray Tune sweeps through the command line: a small real sweep that is interrupted and resumed, its
table, plot and best configuration (which trains as is), and bad search spaces as clear errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.tune.schedulers import TrialScheduler

from slidestream.cli import main
from slidestream.cluster.config import load_config
from slidestream.testing.bags import write_bags
from slidestream.trainers.tune.sweep import early_stopping

pytestmark = pytest.mark.slow
ENV = {**os.environ, "SLIDESTREAM_PROGRESS": "0"}
BASE = ("--set", "ray.num_cpus=2", "--set", "train.folds=2", "--set", "train.min_epochs=2", "--workers", "0")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "slidestream.cli", *args]


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-bags")
    labels = write_bags(str(root), n_slides=24, dim=16, n_instances=(10, 30), seed=2, witness_frac=0.2)
    return str(root / "features"), labels


def _space(tmp_path: Path) -> Path:
    space = tmp_path / "space.yaml"
    space.write_text(
        "train.lr: {loguniform: [1.0e-4, 3.0e-3]}\ntrain.model_options.gated: {grid: [true, false]}\n"
    )
    return space


def _rows(sweep: Path) -> list[dict]:
    with open(sweep / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_interrupted_sweep_resumes_then_writes_table_plot_and_a_best_config_that_trains(
    ray_local, bags, tmp_path
):
    """One trial at a time (one CPU): Ctrl-C after the first finishes, rerun, the rest is trained."""
    features, labels = bags
    out = tmp_path / "out"
    common = ("--out", str(out), "--features", features, "--labels", labels, *BASE)
    args = _cli("tune", "mil", "--name", "sw", "--space", str(_space(tmp_path)), "--trials", "1",
                "--epochs", "10", *common, "--set", "train.min_epochs=10",
                "--set", "ray.num_cpus=1")  # fmt: skip
    first = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = out / "tune" / "sw"
    deadline = time.time() + 300
    finished: dict[Path, float] = {}
    while time.time() < deadline and first.poll() is None and not finished:
        finished = {p: p.stat().st_mtime for p in (root / "trials").glob("*/mil-s0-f0/result.json")}
        time.sleep(0.5)
    assert finished, "no trial finished before the deadline"
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    first.communicate(timeout=120)

    again = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    for path, mtime in finished.items():
        assert path.stat().st_mtime == mtime, f"{path} was trained again"
    rows = _rows(root)
    assert len(rows) == 2 and len({r["trial"] for r in rows}) == 2  # 1 sample × 2 grid values
    assert {r["train.model_options.gated"] for r in rows} == {"true", "false"}
    assert all(int(r["epochs"]) == 10 for r in rows)
    assert (root / "results.png").stat().st_size > 1000 and (root / "results.parquet").exists()

    best_file = root / "best_config.yaml"
    best = load_config(best_file)
    best_row = min(rows, key=lambda r: float(r["val_loss"]))
    assert best.train.lr == pytest.approx(float(best_row["train.lr"]))
    assert str(best.train.model_options["gated"]).lower() == best_row["train.model_options.gated"]

    # the best configuration trains as is (in this process)
    assert main(["train", "mil", "--name", "from-best", "--config", str(best_file), *common]) == 0
    assert (out / "runs" / "from-best" / "metrics.json").exists()


@pytest.mark.parametrize("epochs", range(1, 18))
def test_early_stopping_cuts_poor_trials_at_a_rung_and_never_at_the_final_epoch(epochs):
    """The real scheduler, fed results: a trial poor from the start is cut at the grace period (when one
    fits before the final epoch); one that only falls behind at its final epoch finishes (a cut there
    would save nothing and lose the result the trial is writing)."""
    for grace in range(1, epochs + 1):
        scheduler = early_stopping(epochs, grace)
        scheduler.set_search_properties("val_auc", "max")
        assert TrialScheduler.STOP not in _decisions(scheduler, "good", epochs, lambda t: 0.9)
        fades = _decisions(scheduler, "fades", epochs, lambda t: 0.95 if t < epochs else 0.1)
        assert TrialScheduler.STOP not in fades, (epochs, grace)
        poor = _decisions(scheduler, "poor", epochs, lambda t: 0.5)
        first_cut = poor.index(TrialScheduler.STOP) + 1 if TrialScheduler.STOP in poor else None
        assert first_cut == (grace if grace < epochs else None), (epochs, grace)


def _decisions(scheduler: Any, trial_id: str, epochs: int, auc_at: Callable[[int], float]) -> list[str]:
    """The scheduler's decision after each epoch of a trial whose validation AUC is `auc_at(epoch)`."""
    trial = SimpleNamespace(trial_id=trial_id)
    scheduler.on_trial_add(None, trial)
    results = ({"training_iteration": t, "val_auc": auc_at(t)} for t in range(1, epochs + 1))
    return [scheduler.on_trial_result(None, trial, result) for result in results]


def test_bad_search_space_names_the_key(bags, tmp_path, capsys):
    features, labels = bags
    space = tmp_path / "bad.yaml"
    for text, needle in (
        ("train.lr: {normal: [0, 1]}\n", "unknown distribution 'normal'"),
        ("train.no_such_key: {choice: [1, 2]}\n", "train.no_such_key"),
        ("train.lr: {loguniform: [0, 1]}\n", "train.lr"),
    ):
        space.write_text(text)
        code = main(["tune", "mil", "--name", "bad", "--space", str(space), "--out", str(tmp_path / "o"),
                     "--features", features, "--labels", labels])  # fmt: skip
        assert code == 2 and needle in capsys.readouterr().err
        assert not (tmp_path / "o" / "tune" / "bad").exists()


# warm-up over all 3 epochs: ASHA's grace period is the warm-up, so neither trial can be cut (which trial
# reports first decides whether a poor one is cut, a race this test is not about)
GIGASSL_SMALL = ("gigassl.epochs=3", "gigassl.batch_size=8", "gigassl.dim=32", "gigassl.proj_dim=16",
                 "gigassl.warmup_epochs=3", "gigassl.export_chunks=4", "gigassl.cache_mb=64",
                 "gigassl.init_weights=random")  # fmt: skip


def test_gigassl_sweep_compares_trials_by_a_linear_probe_after_every_epoch(ray_local, bags, tmp_path):
    """Giga-SSL trials train on every slide's views (plain bags: one view each) and are compared by the
    validation AUC of a linear probe on the fold split; the chosen configuration trains as is."""
    features, labels = bags
    out = tmp_path / "out"
    space = tmp_path / "space.yaml"
    space.write_text("gigassl.lr: {grid: [1.0e-3, 1.0e-5]}\ngigassl.tau: {uniform: [0.05, 0.2]}\n")
    settings = [x for s in (*GIGASSL_SMALL, "train.folds=2", "ray.num_cpus=2") for x in ("--set", s)]
    common = ["--out", str(out), "--features", features, *settings]
    argv = ["tune", "gigassl", "--name", "ssl", "--space", str(space), "--trials", "1", "--workers", "0"]
    assert main([*argv, "--labels", labels, *common]) == 0
    root = out / "tune" / "ssl"
    rows = _rows(root)
    assert len(rows) == 2 and {float(r["gigassl.lr"]) for r in rows} == {1e-3, 1e-5}
    for row in rows:
        assert int(row["epochs"]) == 3 and 0.0 <= float(row["val_auc"]) <= 1.0
        assert 0.0 <= float(row["test_auc"]) <= 1.0
        history = json.loads((root / "trials" / row["trial"] / "result.json").read_text())["history"]
        assert [h["epoch"] for h in history] == [0, 1, 2] and all("val_auc" in h for h in history)
        assert float(row["val_auc"]) == pytest.approx(history[-1]["val_auc"])  # the last epoch counts
    best = load_config(root / "best_config.yaml")
    best_row = max(rows, key=lambda r: float(r["val_auc"]))
    assert best.gigassl.lr == pytest.approx(float(best_row["gigassl.lr"]))
    assert best.gigassl.tau == pytest.approx(float(best_row["gigassl.tau"]))
    train = ["train", "gigassl", "--name", "from-best", "--config", str(root / "best_config.yaml")]
    assert main([*train, "--out", str(out), "--features", features]) == 0
    assert (out / "runs" / "from-best" / "embeddings.parquet").exists()

    # Giga-SSL trials need labels for the probe that compares them
    assert main([*argv, "--name", "nolabels", *common]) == 2
