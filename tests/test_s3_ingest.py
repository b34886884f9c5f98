"""Slides in a real S3 server (Ceph RGW on loopback), read with range reads, outputs written back to S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from slidestream.cluster.storage import filesystem
from slidestream.pipelines.ingest import run_ingest
from slidestream.testing.helpers import committed_samples, make_config


@pytest.fixture()
def s3_slides(s3_server, slide_root):
    s3_server.make_bucket("slides-in")
    s3_server.make_bucket("slides-out")
    fs, _ = filesystem("s3://slides-in")
    for path in sorted(slide_root.glob("*.svs")):
        fs.put_file(str(path), f"slides-in/batch1/{path.name}")
    return "s3://slides-in/batch1"


def test_ingest_from_and_to_object_storage(ray_local, s3_server, s3_slides, slide_root, tmp_path):
    config = make_config()
    local = str(tmp_path / "local")
    run_ingest(str(slide_root), local, config)
    out = "s3://slides-out/run1"
    report = run_ingest(s3_slides, out, config)
    assert sorted(report.ok) == ["slide_000", "slide_001", "slide_002", "slide_003"], report.summary()
    from_s3, from_disk = committed_samples(out, config), committed_samples(local, config)
    assert from_s3.keys() == from_disk.keys()
    assert all(from_s3[k]["jpg"] == from_disk[k]["jpg"] for k in from_disk)

    again = run_ingest(s3_slides, out, config)
    assert again.skipped_unchanged == 4 and not again.ok

    env = {**os.environ, "SLIDESTREAM_PROGRESS": "0"}
    status = subprocess.run(
        [sys.executable, "-m", "slidestream.cli", "status", "--out", out, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    payload = json.loads(status.stdout)
    assert payload["totals"]["ok"] == 4 and payload["totals"]["tiles"] == report.tiles
    assert {s["slide_id"] for s in payload["slides"]} == set(report.ok)

    # No credential reaches anything we write or print.
    fs, _ = filesystem(out)
    secret = s3_server.secret_key
    for path in fs.find("slides-out/run1"):
        if not path.endswith(".tar"):
            assert secret not in fs.cat_file(path).decode(errors="ignore"), path
    assert secret not in status.stdout + status.stderr
