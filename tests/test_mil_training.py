"""MIL / MHIM training on Ray Train: the MHIM step (EMA teacher, masking), equivalence with the baseline,
multi-worker runs and their outputs, resume after a killed driver, a killed worker, and refused inputs."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slidestream.testing.bags import with_split, write_bags, write_order_bags
from slidestream.testing.helpers import make_config, session_driver_env
from slidestream.trainers.data import TrainDataError
from slidestream.trainers.mil.loop import MHIMStep
from slidestream.trainers.mil.mhim import PRESETS
from slidestream.trainers.mil.runner import run_training
from slidestream.trainers.models import build_model
from slidestream.trainers.models.base import as_bag

ROOT = Path(__file__).resolve().parents[1]
FAST = ("train.workers=0", "train.parallel_folds=1", "train.folds=2", "train.lr=1e-3")


def _mhim_params(preset: str = "C16-ABMIL", **changes) -> dict:
    params = {k: v for k, v in PRESETS[preset].items() if k != "model"}
    params.update(changes)
    return params


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _history(result: Path, key: str = "epoch") -> list:
    return [row[key] for row in json.loads(result.read_text())["history"]]


@pytest.fixture(scope="module")
def small_bags(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("train-bags")
    labels = write_bags(str(root), n_slides=24, dim=16, n_instances=(8, 24), witness_frac=0.3)
    return str(root / "features"), labels


# -- the MHIM step, driven directly ------------------------------------------------------------------------


def _bag(n: int = 30, dim: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_teacher_gets_no_gradient_and_moves_only_by_ema():
    torch.manual_seed(0)
    student = build_model("abmil", 16, 2)
    baseline = build_model("abmil", 16, 2)
    m = 0.9
    step_fn = MHIMStep(student, _mhim_params(momentum=m), baseline.state_dict(), total_steps=10)
    teacher = step_fn.teacher
    # Teacher initialisation: the baseline; the student takes only its instance-embedding Linear.
    assert all(
        torch.equal(a, b)
        for a, b in zip(teacher.state_dict().values(), baseline.state_dict().values(), strict=True)
    )
    assert torch.equal(student.embed[0].weight, baseline.embed[0].weight)
    assert not torch.equal(student.head.weight, baseline.head.weight)
    assert teacher.training, "the teacher runs in train mode (dropout on), as in the official code"
    assert all(not p.requires_grad for p in teacher.parameters())

    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        old = {name: p.detach().clone() for name, p in teacher.named_parameters()}
        x, y = _bag(seed=step), torch.tensor([step % 2])
        loss = step_fn.loss(student, x, y, step, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is None for p in teacher.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        optimizer.step()
        step_fn.after_step(student, step)
        for name, p in teacher.named_parameters():
            expected = m * old[name] + (1 - m) * dict(student.named_parameters())[name].detach()
            torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)
        assert any(not torch.equal(p, old[n]) for n, p in teacher.named_parameters())


def test_teacher_with_momentum_one_never_changes():
    torch.manual_seed(0)
    student = build_model("abmil", 16, 2)
    step_fn = MHIMStep(student, _mhim_params(momentum=1.0, momentum_cosine=False), None, total_steps=5)
    start = {n: p.detach().clone() for n, p in step_fn.teacher.named_parameters()}
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        loss = step_fn.loss(student, _bag(seed=step), torch.tensor([1]), step, gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_fn.after_step(student, step)
    assert not torch.equal(student.head.weight, start["head.weight"]), "the student did learn"
    assert all(torch.equal(p, start[n]) for n, p in step_fn.teacher.named_parameters())


def test_transmil_multi_head_scores_step():
    torch.manual_seed(0)
    student = build_model("transmil", 16, 2, n_landmarks=8)  # fewer landmarks: a quicker step
    step_fn = MHIMStep(student, _mhim_params("C16-TransMIL", momentum=0.5), None, total_steps=4)
    with torch.no_grad():
        assert step_fn.teacher(_bag(20))["scores"].shape == (8, 20)  # H × N scores: masked by head votes
    seen = _record_bag_sizes(student)
    old = {n: p.detach().clone() for n, p in step_fn.teacher.named_parameters()}
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    loss = step_fn.loss(student, _bag(20), torch.tensor([1]), 0, torch.Generator().manual_seed(0))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    step_fn.after_step(student, 0)
    assert math.isfinite(loss.item())
    # l = 0.8 drops the 16 lowest (mean over heads), h = 0.03 one of the 2 most-voted (unless it is low too)
    assert len(seen) == 1 and seen[0] in (3, 4)
    for name, p in step_fn.teacher.named_parameters():
        expected = 0.5 * old[name] + 0.5 * dict(student.named_parameters())[name].detach()
        torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)


def _record_bag_sizes(model: torch.nn.Module) -> list[int]:
    """Wrap the model's forward so every call records the bag size it receives (the logic is untouched)."""
    sizes: list[int] = []
    forward = model.forward

    def recording(x, *args, **kwargs):
        sizes.append(as_bag(x, "recorded").shape[0])
        return forward(x, *args, **kwargs)

    model.forward = recording
    return sizes


_ratio = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=st.sampled_from(["abmil", "dsmil"]),
    n=st.integers(1, 40),
    r=_ratio,
    low=_ratio,
    high=_ratio,
    hr=st.floats(0.01, 1.0),
    alpha=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 1000),
)
def test_masking_never_drops_every_instance(model, n, r, low, high, hr, alpha, seed):
    torch.manual_seed(seed)
    student = build_model(model, 8, 2)
    params = _mhim_params(
        mask_ratio=r,
        mask_ratio_l=low,
        mask_ratio_h=high,
        mask_ratio_hr=hr,
        mask_ratio_h_decay=False,
        alpha=alpha,
    )
    step_fn = MHIMStep(student, params, None, total_steps=10)
    sizes = _record_bag_sizes(student)  # after MHIMStep: the teacher is a copy of the unwrapped model
    loss = step_fn.loss(
        student, _bag(n, 8, seed), torch.tensor([seed % 2]), 0, torch.Generator().manual_seed(seed)
    )
    loss.backward()
    assert len(sizes) == 1 and 1 <= sizes[0] <= n
    if n > 1 and max(r, low, high) > 0:
        assert sizes[0] < n, "an active strategy drops at least one instance"
    if max(r, low, high) == 0:
        assert sizes[0] == n
    assert math.isfinite(loss.item())


# -- runs (real Ray, Ray Train) -----------------------------------------------------------------------------


def test_mhim_without_masking_or_consistency_trains_exactly_like_the_baseline(
    ray_local, small_bags, tmp_path
):
    features, labels = small_bags
    out = str(tmp_path)
    common = (*FAST, "train.epochs=3", "train.min_epochs=3")
    zero = (
        "train.mhim.teacher_init=none",
        "train.mhim.mask_ratio=0",
        "train.mhim.mask_ratio_l=0",
        "train.mhim.mask_ratio_h=0",
        "train.mhim.alpha=0",
    )
    run_training("mil", "base", out, features, labels, make_config(*common, "train.seeds=[0, 1]"))
    run_training("mhim", "zero", out, features, labels, make_config(*common, *zero))
    masked = (*zero[:-2], "train.mhim.mask_ratio_h=0.2")
    run_training("mhim", "masked", out, features, labels, make_config(*common, *masked))
    for fold in (0, 1):
        base = _weights(tmp_path / f"runs/base/jobs/mil-s0-f{fold}/weights.pt")
        zero_w = _weights(tmp_path / f"runs/zero/jobs/mhim-s0-f{fold}/weights.pt")
        masked_w = _weights(tmp_path / f"runs/masked/jobs/mhim-s0-f{fold}/weights.pt")
        assert base.keys() == zero_w.keys()
        assert all(torch.equal(base[k], zero_w[k]) for k in base), f"fold {fold}: weights differ"
        assert not all(torch.equal(base[k], masked_w[k]) for k in base), "masking must change training"
    assert not (tmp_path / "runs/zero/jobs/mil-s0-f0").exists(), "teacher_init=none trains no baseline"
    a = pd.read_parquet(tmp_path / "runs/base/predictions.parquet")
    b = pd.read_parquet(tmp_path / "runs/zero/predictions.parquet")
    pd.testing.assert_frame_equal(a[a.seed == 0].reset_index(drop=True), b)
    slides = sorted(line.split(",")[0] for line in Path(labels).read_text().split()[1:])
    for seed in (0, 1):  # one prediction per slide per seed: every slide tested exactly once per seed
        assert sorted(a[a.seed == seed].slide_id) == slides
    fold_of = {
        seed: dict(zip(a[a.seed == seed].slide_id, a[a.seed == seed].fold, strict=True)) for seed in (0, 1)
    }
    assert fold_of[0] != fold_of[1], "another seed reshuffles the folds"


FIXED_SPLIT = ["train"] * 20 + ["val"] * 6 + ["test"] * 6  # for 32 bags: one training job per run


def test_shuffled_instances_hide_the_bag_order_from_training(ray_local, tmp_path):
    """TransMIL reads the instances' order (PPEG and the attention's residual convolution run over the
    stored sequence). On bags whose label lies only in that order it fits the label at once; with
    `train.shuffle_instances` every step sees a new order, so the training loss stays at chance or above."""
    labels = with_split(write_order_bags(str(tmp_path / "bags")), str(tmp_path / "split.csv"), FIXED_SPLIT)
    features, out = str(tmp_path / "bags" / "features"), str(tmp_path)
    common = (*FAST, "train.model=transmil", "train.epochs=2", "train.min_epochs=1")
    stored = run_training("mil", "stored", out, features, labels, make_config(*common))
    shuffled = make_config(*common, "train.shuffle_instances=true")
    run_training("mil", "shuffled", out, features, labels, shuffled)
    assert [part["auc"] for part in stored.metrics["folds"]] == [1.0]
    stored_loss = _history(tmp_path / "runs/stored/jobs/mil-s0-f0/result.json", "train_loss")
    shuffled_loss = _history(tmp_path / "runs/shuffled/jobs/mil-s0-f0/result.json", "train_loss")
    assert stored_loss[-1] < 0.1, stored_loss
    assert min(shuffled_loss) > 0.6, shuffled_loss  # chance is ln 2 = 0.69


def _our_train_workers() -> list[psutil.Process]:
    """Ray Train worker processes of this session's Ray instance (descendants of this test process; other
    Ray instances may be running on the machine)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def clear_bags(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("clear-bags")
    labels = write_bags(str(root), n_slides=32, dim=16, n_instances=(8, 24), witness_frac=0.3, seed=1)
    return str(root / "features"), labels


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_worker_run_writes_outputs_with_sane_metrics(ray_local, clear_bags, tmp_path):
    features, labels = clear_bags
    epochs = 4
    config = make_config(
        "train.workers=2",
        "train.cpus_per_worker=0.5",
        "train.folds=2",
        "train.lr=1e-3",
        f"train.epochs={epochs}",
        f"train.min_epochs={epochs}",
        "train.max_failures=0",
    )
    summary = run_training("mil", "two", str(tmp_path), features, labels, config)
    run = tmp_path / "runs" / "two"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == summary.metrics
    assert [(r["seed"], r["fold"]) for r in metrics["folds"]] == [(0, 0), (0, 1)]
    for key in ("auc", "acc", "f1", "acc_at_0.5", "f1_at_0.5"):
        values = [r[key] for r in metrics["folds"]]
        assert metrics["mean"][key] == pytest.approx(np.mean(values))
        assert metrics["std"][key] == pytest.approx(np.std(values))
    assert metrics["mean"]["auc"] >= 0.8, metrics["folds"]
    assert all(r["epochs_run"] == epochs for r in metrics["folds"])

    predictions = pd.read_parquet(run / "predictions.parquet")
    slides = [line.split(",")[0] for line in Path(labels).read_text().split()[1:]]
    assert sorted(predictions.slide_id) == sorted(slides), "every slide tested exactly once"
    assert set(predictions.seed) == {0} and set(predictions.fold) == {0, 1}
    np.testing.assert_allclose(predictions.prob_normal + predictions.prob_tumor, 1.0, atol=1e-5)
    assert set(predictions.label) == set(predictions.prediction) | {"normal", "tumor"}
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "workers: 2" in (run / "config.yaml").read_text()
    plan = json.loads((run / "run.json").read_text())
    assert plan["kind"] == "mil" and plan["dim"] == 16 and len(plan["splits"]) == 2


_CHILD = """
import sys
from slidestream.testing.helpers import make_config
from slidestream.trainers.mil.runner import run_training
out, features, labels, *settings = sys.argv[1:]
run_training("mil", "resumable", out, features, labels, make_config(*settings))
"""


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the run ended before {what}"
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [1, 0], ids=["ray-train-worker", "in-process"])
def test_killed_run_resumes_finished_folds_kept_unfinished_from_checkpoint(
    ray_local, small_bags, tmp_path, workers: int
):
    """Killed mid fold 1, then rerun: fold 0 is kept, fold 1 resumes from its last checkpoint, whether
    it trained on a Ray Train worker (Ray Train keeps the checkpoints) or in the fold's own process
    (`workers: 0`, what `auto` picks without GPUs: slidestream keeps the checkpoint)."""
    features, labels = small_bags
    epochs = 12
    settings_ = (
        f"train.workers={workers}",
        "train.cpus_per_worker=0.5",
        "train.parallel_folds=1",
        "train.folds=2",
        "train.lr=1e-3",
        f"train.epochs={epochs}",
        f"train.min_epochs={epochs}",
    )
    run = tmp_path / "runs" / "resumable"
    done0 = run / "jobs" / "mil-s0-f0" / "result.json"
    ray1 = run / "ray" / "mil-s0-f1"
    env = session_driver_env()
    log = open(tmp_path / "child.log", "wb")  # noqa: SIM115 - closed below, after the process is gone
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), features, labels, *settings_],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def fold1_checkpointed() -> bool:  # a Ray Train checkpoint counts once its snapshot lists it
            listed = ray1 / ("checkpoint_manager_snapshot.json" if workers else "in_process/state.pt")
            return done0.exists() and listed.exists()

        _wait_for(fold1_checkpointed, proc, 200, "fold 1 wrote a checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert not (run / "jobs" / "mil-s0-f1" / "result.json").exists(), "the kill must land mid fold 1"
    assert not (run / "metrics.json").exists()
    finished_mtime = done0.stat().st_mtime_ns
    # Mark the epochs the checkpoints hold: a fold resumed from them carries the mark, a retrained one not.
    for path in ray1.glob("checkpoint_*/state.pt" if workers else "in_process/state.pt"):
        state = torch.load(path, weights_only=True)
        for row in state["history"]:
            row["from_checkpoint"] = True
        torch.save(state, path)

    summary = run_training("mil", "resumable", str(tmp_path), features, labels, make_config(*settings_))
    assert done0.stat().st_mtime_ns == finished_mtime, "a finished fold was trained again"
    assert _history(done0) == list(range(epochs))
    history = json.loads((run / "jobs" / "mil-s0-f1" / "result.json").read_text())["history"]
    assert [row["epoch"] for row in history] == list(range(epochs)), "every epoch exactly once, in order"
    restored = [row["epoch"] for row in history if row.get("from_checkpoint")]
    assert restored and restored == list(range(len(restored))), "fold 1 resumed from its checkpoint"
    assert len(restored) < epochs, "and trained the remaining epochs"
    assert [r["fold"] for r in summary.metrics["folds"]] == [0, 1]
    assert (run / "metrics.json").exists() and (run / "predictions.parquet").exists()

    # The finished run cannot be rerun with other settings: the changed setting is named.
    metrics_mtime = (run / "metrics.json").stat().st_mtime_ns
    with pytest.raises(
        TrainDataError, match=r"already exists .* different train\.model \('abmil' → 'dsmil'\)"
    ):
        run_training(
            "mil", "resumable", str(tmp_path), features, labels, make_config(*settings_, "train.model=dsmil")
        )
    assert (run / "metrics.json").stat().st_mtime_ns == metrics_mtime


@pytest.mark.timeout(300)
def test_rerun_with_more_seeds_keeps_the_finished_splits_and_trains_the_new_ones(
    ray_local, small_bags, tmp_path
):
    features, labels = small_bags
    settings_ = ("train.workers=0", "train.folds=2", "train.epochs=3", "train.min_epochs=3")
    run_training("mil", "seeds", str(tmp_path), features, labels, make_config(*settings_, "train.seeds=[0]"))
    jobs = tmp_path / "runs" / "seeds" / "jobs"
    finished = {p.parent.name: p.stat().st_mtime_ns for p in jobs.glob("*/result.json")}
    assert sorted(finished) == ["mil-s0-f0", "mil-s0-f1"]

    summary = run_training(
        "mil", "seeds", str(tmp_path), features, labels, make_config(*settings_, "train.seeds=[0,1]")
    )
    assert {name: (jobs / name / "result.json").stat().st_mtime_ns for name in finished} == finished
    assert [(r["seed"], r["fold"]) for r in summary.metrics["folds"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    saved = json.loads((tmp_path / "runs" / "seeds" / "run.json").read_text())
    assert saved["train"]["seeds"] == [0, 1] and len(saved["splits"]) == 4

    # Dropping a seed, or adding one along with another change, is still refused.
    with pytest.raises(TrainDataError, match=r"different splits, train\.seeds"):
        run_training(
            "mil", "seeds", str(tmp_path), features, labels, make_config(*settings_, "train.seeds=[1]")
        )
    with pytest.raises(TrainDataError, match=r"different splits, train\.epochs \(3 → 4\), train\.seeds"):
        run_training(
            "mil", "seeds", str(tmp_path), features, labels,
            make_config(*settings_, "train.seeds=[0,1,2]", "train.epochs=4"),
        )  # fmt: skip


def test_run_saved_before_a_new_setting_resumes_at_its_default_and_refuses_another_value(
    ray_local, small_bags, tmp_path
):
    features, labels = small_bags
    settings_ = ("train.workers=0", "train.folds=2", "train.epochs=1", "train.min_epochs=1")
    run_training("mil", "older", str(tmp_path), features, labels, make_config(*settings_))
    plan = tmp_path / "runs" / "older" / "run.json"
    saved = json.loads(plan.read_text())
    del saved["train"]["shuffle_instances"]  # as a version without the setting wrote it
    plan.write_text(json.dumps(saved))
    jobs = tmp_path / "runs" / "older" / "jobs"
    finished = {p.parent.name: p.stat().st_mtime_ns for p in jobs.glob("*/result.json")}

    run_training("mil", "older", str(tmp_path), features, labels, make_config(*settings_))
    assert {name: (jobs / name / "result.json").stat().st_mtime_ns for name in finished} == finished
    with pytest.raises(TrainDataError, match=r"different train\.shuffle_instances \(False → True\)"):
        run_training(
            "mil", "older", str(tmp_path), features, labels,
            make_config(*settings_, "train.shuffle_instances=true"),
        )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_worker_is_restarted_and_the_run_finishes(ray_local, clear_bags, tmp_path):
    features, labels = clear_bags
    split_labels = with_split(labels, str(tmp_path / "split.csv"), FIXED_SPLIT)
    epochs = 24  # long enough that the killer sees both workers and a checkpoint on a loaded 2-core machine
    config = make_config(
        "train.workers=2",
        "train.cpus_per_worker=0.5",
        "train.lr=1e-3",
        f"train.epochs={epochs}",
        f"train.min_epochs={epochs}",
        "train.max_failures=2",
    )
    ray_dir = tmp_path / "runs" / "faulty" / "ray" / "mil-s0-f0"
    killed: list[int] = []
    seen: set[int] = set()
    stop = threading.Event()
    earlier_tests = {p.pid for p in _our_train_workers()}  # may still be exiting; not this run's

    def kill_one_worker() -> None:
        while not stop.is_set():
            workers = [p for p in _our_train_workers() if p.pid not in earlier_tests]
            seen.update(p.pid for p in workers)
            if not killed and len(workers) == 2 and (ray_dir / "checkpoint_manager_snapshot.json").exists():
                workers[-1].send_signal(signal.SIGKILL)
                killed.append(workers[-1].pid)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker, daemon=True)
    killer.start()
    try:
        summary = run_training("mil", "faulty", str(tmp_path), features, split_labels, config)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "a worker must have been killed during training"
    assert len(seen) >= 3, f"a replacement worker was started (saw worker pids {sorted(seen)})"
    result = tmp_path / "runs" / "faulty" / "jobs" / "mil-s0-f0" / "result.json"
    assert _history(result) == list(range(epochs)), "every epoch exactly once after the restart"
    assert [r["fold"] for r in summary.metrics["folds"]] == [0]
    assert summary.metrics["folds"][0]["epochs_run"] == epochs
    assert (tmp_path / "runs" / "faulty" / "metrics.json").exists()


# -- refused inputs: a clear error and nothing written ----------------------------------------------------


def _copy_bags(features: str, target: Path) -> Path:
    target.mkdir()
    for path in Path(features).glob("*.parquet"):
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _raw_bag(path: Path, features: np.ndarray) -> None:
    """A bag Parquet file written by hand (our writer refuses empty and non-finite bags)."""
    n, dim = features.shape
    flat = pa.array(features.reshape(-1), pa.float32())
    table = pa.table(
        {
            "x": pa.array(np.arange(n), pa.int32()),
            "y": pa.array(np.zeros(n), pa.int32()),
            "feature": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    path.write_bytes(buffer.getvalue())


def _bad_dim(bags: Path, labels: str) -> str:
    _raw_bag(bags / "slide-003.parquet", np.ones((6, 20), np.float32))
    return labels


def _empty(bags: Path, labels: str) -> str:
    _raw_bag(bags / "slide-003.parquet", np.ones((0, 16), np.float32))
    return labels


def _nan(bags: Path, labels: str) -> str:
    values = np.ones((6, 16), np.float32)
    values[2, 5] = np.nan
    _raw_bag(bags / "slide-003.parquet", values)
    return labels


def _inf(bags: Path, labels: str) -> str:
    values = np.ones((6, 16), np.float32)
    values[4, 0] = -np.inf
    _raw_bag(bags / "slide-003.parquet", values)
    return labels


def _no_bag(bags: Path, labels: str) -> str:
    (bags / "slide-003.parquet").unlink()
    return labels


def _fold_without_tumor(bags: Path, labels: str) -> str:
    """A labels file whose fold 2 holds no tumor slide (its test part then has a single class)."""
    rows = [line.split(",") for line in Path(labels).read_text().split()[1:]]
    text = "slide_id,label,fold\n"
    for i, (sid, label) in enumerate(rows):
        text += f"{sid},{label},{2 if label == 'normal' and i % 3 == 0 else i // 2 % 2}\n"
    path = bags.parent / "folds.csv"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_bad_dim, r"feature dimension differs .* slide-003 has D=20"),
        (_empty, r"slide-003.* no tiles"),
        (_nan, r"slide-003.*NaN/inf features in 1 of 6 rows"),
        (_inf, r"slide-003.*NaN/inf features in 1 of 6 rows"),
        (_no_bag, r"names 1 slide\(s\) with no feature bag.*slide-003"),
        (
            _fold_without_tumor,
            r"fold 2 \(seed 0\): the test part \(\d+ slides\) has no slide of class\(es\) \[.tumor.\]",
        ),
    ],
    ids=["dimension-mismatch", "empty-bag", "nan", "inf", "label-without-bag", "single-class-fold"],
)
def test_refused_inputs_give_a_clear_error_and_write_nothing(
    ray_local, small_bags, tmp_path, corrupt, message
):
    features, labels = small_bags
    bags = _copy_bags(features, tmp_path / "features")
    labels = corrupt(bags, labels)
    config = make_config(*FAST, "train.folds=3", "train.epochs=2", "train.max_failures=0")
    with pytest.raises(ValueError, match=message):
        run_training("mil", "refused", str(tmp_path / "out"), str(bags), labels, config)
    assert not (tmp_path / "out" / "runs" / "refused").exists()
