"""Kill the ingest driver with SIGKILL mid-run, rerun: the committed tiles equal an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from slidestream.cli import main
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.ledger import Ledger
from slidestream.testing.helpers import committed_samples, make_config, session_driver_env

SETTINGS = ("tiling.tile_px=64", "shards.max_tiles=150")  # many small tiles → a run long enough to kill


def _ingest_command(slides: Path, out: Path) -> list[str]:
    command = [sys.executable, "-m", "slidestream.cli", "ingest", "--slides", str(slides), "--out", str(out)]
    for setting in (*SETTINGS, "ray.num_cpus=2", "ray.object_store_mb=512"):
        command += ["--set", setting]
    return command


def _wait_for_first_commit(ledger_dir: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger_dir.is_dir() and any("-commit-" in p.name for p in ledger_dir.iterdir()):
            return
        assert proc.poll() is None, "the ingest run ended before it could be killed"
        time.sleep(0.05)
    raise AssertionError("no slide was committed in time")


def test_sigkill_mid_run_then_rerun_commits_exactly_once(ray_local, slide_root, tmp_path, capsys):
    config = make_config(*SETTINGS)
    reference = tmp_path / "reference"
    run_ingest(str(slide_root), str(reference), config)
    expected = committed_samples(str(reference), config)

    out = tmp_path / "killed"
    # the killed driver runs on this session's Ray instance, as a driver on a cluster would
    env = session_driver_env()
    log = open(tmp_path / "killed.log", "wb")  # noqa: SIM115 - closed below, after the process is gone
    proc = subprocess.Popen(
        _ingest_command(slide_root, out),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_first_commit(out / "ledger", proc)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    partial = Ledger(str(out)).entries("tiles/mpp0.50_px64")
    assert 1 <= len(partial) < 4, "the kill must land in the middle of the run"
    assert not any("-snapshot-" in p.name for p in (out / "ledger").iterdir())

    assert main(_ingest_command(slide_root, out)[3:]) == 0  # the rerun, in this process
    assert f"{len(partial)} unchanged (skipped)" in capsys.readouterr().out

    got = committed_samples(str(out), config)
    assert got.keys() == expected.keys()
    assert all(got[key]["jpg"] == expected[key]["jpg"] for key in expected)
    stage_dir = out / "tiles" / "mpp0.50_px64"
    referenced = {name for e in Ledger(str(out)).entries("tiles/mpp0.50_px64") for name in e.shards}
    assert {p.name for p in stage_dir.glob("shard-*")} == referenced, (
        "files of the killed run were not collected"
    )
