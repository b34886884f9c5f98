"""The command line as a user runs it: synth, ingest --strict, status --json, errors for bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from slidestream import cli
from slidestream.cli import main
from slidestream.cluster.config import Config
from slidestream.cluster.errors import UsageError

ENV = {**os.environ, "SLIDESTREAM_PROGRESS": "0"}


def _slidestream(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slidestream.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_synth_ingest_strict_and_status(tmp_path: Path, ray_local, capsys):
    """synth and status in their own processes; the two ingests in this one, on the session's Ray."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    made = _slidestream("synth", "--out", str(slides), "--n-slides", "2", "--seed", "3", "--format", "tiff")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in slides.glob("*.tiff")) == ["slide_000.tiff", "slide_001.tiff"]
    (slides / "broken.svs").write_bytes(b"II*\x00garbage")

    common = ["ingest", "--slides", str(slides), "--out", str(out)]
    assert main([*common, "--labels", str(slides / "labels.csv")]) == 0
    lenient = capsys.readouterr().out
    assert "2 ingested, 1 failed" in lenient and "FAILED broken:" in lenient

    (slides / "broken.svs").write_bytes(b"II*\x00still garbage")  # changed file → retried, fails again
    assert main([*common, "--strict"]) == 3
    assert "2 unchanged (skipped), 0 ingested, 1 failed" in capsys.readouterr().out  # only it was retried

    status = _slidestream("status", "--out", str(out), "--json")
    payload = json.loads(status.stdout)
    assert payload["totals"] == {
        "slides": 3,
        "ok": 2,
        "failed": 1,
        "skipped": 0,
        "tiles": sum(s["n_tiles"] for s in payload["slides"]),
    }
    broken = next(s for s in payload["slides"] if s["slide_id"] == "broken")
    assert broken["status"] == "failed" and broken["n_tiles"] == 0 and broken["error"]
    # the reader each slide was opened with (TIFF content: tiffslide, also for the one that then failed)
    assert {s["slide_id"]: s["backend"] for s in payload["slides"]} == dict.fromkeys(
        ["broken", "slide_000", "slide_001"], "tiffslide"
    )
    table = _slidestream("status", "--out", str(out)).stdout
    assert "reader" in table.splitlines()[1] and table.count("tiffslide") == 3, table

    # every ledger column, for tools users already have: CSV on stdout, Parquet to a file
    as_csv = _slidestream("status", "--out", str(out), "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(as_csv)))
    assert sorted(r["slide_id"] for r in rows) == ["broken", "slide_000", "slide_001"]
    ok = next(r for r in rows if r["slide_id"] == "slide_000")
    assert ok["status"] == "ok" and ok["shards"].startswith("shard-") and json.loads(ok["versions"])
    exported = tmp_path / "state.parquet"
    to_file = ["--format", "parquet", "--output", str(exported)]
    assert _slidestream("status", "--out", str(out), *to_file).returncode == 0
    frame = pq.read_table(exported).to_pandas()
    assert sorted(frame.slide_id) == ["broken", "slide_000", "slide_001"]
    tiles = {s["slide_id"]: s["n_tiles"] for s in payload["slides"]}
    assert frame.set_index("slide_id").n_tiles.to_dict() == tiles
    no_file = _slidestream("status", "--out", str(out), "--format", "parquet")
    assert no_file.returncode == 2 and "--output PATH" in no_file.stderr
    both = _slidestream("status", "--out", str(out), "--json", "--format", "csv")
    assert both.returncode == 2 and "contradict" in both.stderr


def test_bad_config_and_missing_inputs_are_clear_errors(tmp_path: Path):
    bad_key = _slidestream("status", "--out", str(tmp_path), "--set", "tiling.mmp=0.5")
    assert bad_key.returncode == 2 and "tiling.mmp" in bad_key.stderr
    missing = _slidestream("ingest", "--slides", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "slide source not found" in missing.stderr
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na,1\n")
    bad_labels = _slidestream(
        "ingest", "--slides", str(tmp_path), "--out", str(tmp_path / "o"), "--labels", str(labels)
    )
    assert bad_labels.returncode == 2 and "lacks column(s) slide_id" in bad_labels.stderr


def test_a_slidestream_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def refuses(config: Config, *, out: str, as_json: bool, stage: str | None) -> int:
        raise UsageError(f"cannot use {out}")

    def breaks(config: Config, *, out: str, as_json: bool, stage: str | None) -> int:
        raise ValueError("an internal mistake")

    monkeypatch.setattr(cli, "_command", lambda name: refuses)
    assert main(["status", "--out", "here", "--json"]) == UsageError.exit_code == 2
    assert capsys.readouterr().err == "slidestream status: cannot use here\n"
    monkeypatch.setattr(cli, "_command", lambda name: breaks)
    with pytest.raises(ValueError, match="an internal mistake"):
        main(["status", "--out", "here"])


def test_train_and_tune_refuse_missing_flags_in_one_line(tmp_path: Path, capsys):
    """What each kind needs comes from the method table; the wording is the command line's."""
    out = ["--name", "r", "--out", str(tmp_path)]
    cases = {
        ("train", "mil"): "train mil needs --labels",
        ("train", "icmil", "--labels", "l.csv"): (
            "train icmil needs --labels, --encoder and --weights (a local file, or 'random')"
        ),
        ("train", "mhim", "--labels", "l.csv"): f"pass --features: {tmp_path}/features holds 0 feature sets",
        ("train", "gigassl", "--export"): f"pass --features: {tmp_path}/gigassl holds 0 feature sets",
        ("tune", "gigassl", "--space", "s.yaml"): f"pass --features: {tmp_path}/gigassl holds 0 feature sets",
    }
    for args, message in cases.items():
        assert main([*args[:2], *out, *args[2:]]) == UsageError.exit_code
        assert capsys.readouterr().err.startswith(f"slidestream {args[0]}: {message}")


@pytest.mark.parametrize(
    ("kind", "section"), [("mil", "train"), ("mhim", "train"), ("icmil", "icmil"), ("cdma", "cdma")]
)
def test_recipe_flag_switches_the_kinds_own_section(kind: str, section: str):
    args = cli.build_parser().parse_args(["train", kind, "--name", "r", "--out", "o", "--recipe", "paper"])
    config = cli._config_from(args)
    assert getattr(config, section).recipe == "paper"
    others = {"train", "icmil", "cdma", "gigassl"} - {section}
    assert all(getattr(config, other).recipe == "default" for other in others)


def test_the_command_line_starts_without_the_heavy_libraries():
    """Building the parser must not import torch, scikit-learn, Ray or timm (seconds on every command,
    `slidestream status` included): they are imported when a command runs."""
    heavy = ("torch", "sklearn", "ray", "timm", "spconv")
    code = (f"import sys; from slidestream.cli import build_parser; build_parser(); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")  # fmt: skip
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout
