"""The console a user sees: our lines, a progress line and the results, not Ray's internals (they go to
OUT/logs/); `-v` brings them back; two commands started at once on one machine each run on their own
local Ray instance, with no error lines either way."""

from __future__ import annotations

import logging
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from slidestream.cluster.console_routing import CONSOLE_ENV
from slidestream.console import ConsoleHandler, LiveLine
from slidestream.testing.bags import write_bags
from slidestream.testing.helpers import ray_internal_lines


def _own_instance_env() -> dict[str, str]:
    """The environment of a user's shell: no Ray address, so each command starts its own instance."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", CONSOLE_ENV)}
    env["SLIDESTREAM_PROGRESS"] = "0"
    return env


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "slidestream.cli", *args],
        env=_own_instance_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 600) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout, stderr


def test_two_commands_at_once_show_only_their_own_lines(slide_root: Path, tmp_path: Path):
    """`train` (Ray Train worker groups) while `ingest` runs in another terminal: both finish, neither
    console has a Ray internal line, and the lines Ray printed are in each command's log file."""
    labels = write_bags(str(tmp_path / "bags"), n_slides=16, dim=16, n_instances=(8, 24), witness_frac=0.3)
    features = str(tmp_path / "bags" / "features")
    train_out, ingest_out = tmp_path / "train-out", tmp_path / "ingest-out"
    train = _start(
        "train", "mil", "--name", "quiet", "--out", str(train_out), "--features", features,
        "--labels", labels, "--folds", "2", "--epochs", "3", "--workers", "1",
        "--set", "train.min_epochs=1",
    )  # fmt: skip
    ingest = _start("ingest", "--slides", str(slide_root), "--out", str(ingest_out))
    train_stdout, train_stderr = _finish(train)
    ingest_stdout, ingest_stderr = _finish(ingest)

    for text in (train_stdout + train_stderr, ingest_stdout + ingest_stderr):
        assert not ray_internal_lines(text), ray_internal_lines(text)
    assert "mean ± std" in train_stdout  # the results table
    assert re.search(r"mil-s0-f\d epoch \d/3 .*val_auc", train_stderr)  # epoch lines, routed from workers
    assert "4 ingested, 0 failed" in ingest_stdout
    assert re.search(r"\[tiles/\S+\] \d/4 slides, \d+ tiles, [\d.]+ tiles/s, ETA", ingest_stderr)

    train_log = next((train_out / "logs").glob("train-*.log")).read_text()
    assert "Reporting training result" in train_log  # Ray Train's worker lines: in the file, not lost
    assert f"log: {train_out / 'logs'}" in train_stderr
    ingest_log = next((ingest_out / "logs").glob("ingest-*.log")).read_text()
    assert "Execution plan of Dataset" in ingest_log and "4 ingested, 0 failed" in ingest_log


def test_verbose_gives_ray_its_console_back(slide_root: Path, tmp_path: Path):
    stdout, stderr = _finish(_start("ingest", "--slides", str(slide_root), "--out", str(tmp_path), "-v"))
    assert "4 ingested, 0 failed" in stdout
    assert "Execution plan of Dataset" in stderr  # Ray Data's executor, on the console again


def _read_until_closed(controller: int) -> bytes:
    """Everything the terminal side wrote: one read may return only part of it."""
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the terminal side is closed and drained
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return b"".join(chunks)


def test_on_a_terminal_the_progress_line_is_redrawn_in_place():
    """A pseudo-terminal: progress records overwrite one line, other lines are written above it."""
    controller, terminal = pty.openpty()
    with os.fdopen(terminal, "w") as stream:
        handler = ConsoleHandler(LiveLine(stream), verbose=False)
        lines = (("[tiles] 1/2 slides", True), ("[tiles] 2/2 slides", True), ("done", False))
        for message, progress in lines:
            record = logging.LogRecord("slidestream.x", logging.INFO, __file__, 0, message, None, None)
            record.progress = progress
            handler.emit(record)
        ray_record = logging.LogRecord("ray.data", logging.INFO, __file__, 0, "Execution plan", None, None)
        handler.emit(ray_record)  # quiet: Ray's info lines are for the log file
    shown = _read_until_closed(controller).decode()
    assert shown == "\r\x1b[K[tiles] 1/2 slides\r\x1b[K[tiles] 2/2 slides\r\x1b[Kdone\r\n"
