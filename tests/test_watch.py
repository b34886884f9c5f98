"""`watch` step by step, in this process, on real Ray and real slides: slides that are still arriving,
slides that change or vanish while being processed, scoring with a trained run, the writer lock, and
the command's refusals of bad input."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from slidestream.cli import main
from slidestream.pipelines.embed import EmbedStage
from slidestream.pipelines.features import FeatureBags
from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.pipelines.slides import discover_slides
from slidestream.pipelines.synthetic import SlideSpec, write_slide
from slidestream.pipelines.tile_store import tiles_stage
from slidestream.pipelines.watch import Watcher
from slidestream.pipelines.writer_lock import WriterLock, WriterLockError
from slidestream.testing.bags import write_bags
from slidestream.testing.helpers import committed_samples, make_config, session_driver_env
from slidestream.testing.s3server import start_s3_server, stop_s3_server
from slidestream.trainers.mil.runner import run_training
from slidestream.trainers.mil.stream_scoring import NewSlideScorer

# Small slides, big tiles, a small encoder input: a slide takes a second or two on 2 cores.
SETTINGS = (
    "tiling.tile_px=256",
    "embed.input_px=32",
    "embed.dtype=float32",
    "watch.interval_s=0.2",
    "watch.max_backoff_s=2",
)
SLIDE = (4096, 3072)
ENV = {**os.environ, "SLIDESTREAM_PROGRESS": "0"}


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("watch-slides")
    for i in range(5):
        write_slide(root / f"w{i}.svs", SlideSpec(*SLIDE, positive=i % 2 == 1, seed=30 + i))
    return root


def _watcher(slides: Path, out: Path, **kwargs) -> Watcher:
    config = make_config(*SETTINGS)
    embed = EmbedStage("resnet18_trunc", "random", config.tiling, config.embed)
    return Watcher(str(slides), str(out), config, embed, echo=lambda line: None, **kwargs)


def _entries(out: Path, watcher: Watcher) -> dict[str, dict]:
    """slide_id → {stage: entry} of the committed ledger."""
    found: dict[str, dict] = {}
    for (stage, slide_id), entry in Ledger(str(out)).state().items():
        found.setdefault(slide_id, {})[stage] = entry
    assert all(stage in watcher.stages for by_stage in found.values() for stage in by_stage)
    return found


def _assert_bag_matches_tiles(out: Path, watcher: Watcher, slide_id: str) -> None:
    tiles = Ledger(str(out)).state()[(watcher.stages[0], slide_id)]
    bags = FeatureBags(str(out / watcher.embed.stage))
    coords = bags.load(slide_id).coords.numpy()
    assert tiles.status == "ok" and len(coords) == tiles.n_tiles > 0
    assert len({tuple(c) for c in coords}) == len(coords), "a tile's features were committed twice"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> str:
    """A MIL run trained in this process on synthetic 256-d bags (the resnet18_trunc feature size)."""
    root = tmp_path_factory.mktemp("run")
    labels = write_bags(str(root / "train"), n_slides=8, dim=256, n_instances=(6, 12), seed=3)
    config = make_config("train.folds=2", "train.epochs=2", "train.min_epochs=1", "train.workers=0")
    run_training("mil", "scorer", str(root), str(root / "train" / "features"), labels, config)
    return str(root / "runs" / "scorer")


def test_half_uploaded_slide_waits_then_fails_then_commits_and_is_scored_once(
    ray_local, small_slides, trained_run, tmp_path
):
    slides, out = tmp_path / "in", tmp_path / "out"
    slides.mkdir()
    data = (small_slides / "w0.svs").read_bytes()
    target = slides / "w0.svs"
    target.write_bytes(data[: len(data) // 2])
    watcher = _watcher(slides, out)
    output = out / "watch" / "predict" / "scorer"
    features = str(out / watcher.embed.stage)
    watcher.on_committed = NewSlideScorer(trained_run, features, str(output))

    assert watcher.step() is False and watcher.status.waiting == 1  # first sight: not taken yet
    with open(target, "ab") as handle:  # the upload goes on
        handle.write(data[len(data) // 2 : 3 * len(data) // 4])
    assert watcher.step() is False and watcher.status.waiting == 1, "a growing file must not be taken"

    # The upload stalls long enough to look complete: processed, and recorded as failed, never as ok.
    assert watcher.step() is True
    entries = _entries(out, watcher)["w0"]
    assert {e.status for e in entries.values()} == {"failed"}
    assert all(not e.shards for e in entries.values())
    assert not list((out / watcher.embed.stage).glob("*.parquet"))
    assert watcher.status.failed == 1 and watcher.status.committed == 0

    target.write_bytes(data)  # the upload completes: a new fingerprint, taken one poll later
    assert watcher.step() is False and watcher.status.waiting == 1
    assert watcher.step() is True
    assert {e.status for e in _entries(out, watcher)["w0"].values()} == {"ok"}
    _assert_bag_matches_tiles(out, watcher, "w0")
    assert watcher.step() is False and watcher.status.waiting == 0  # nothing left to do

    # The committed slide was scored once: predictions appended as a part, a heatmap beside them.
    assert watcher.status.scored == 1
    table = pq.read_table(output / "predictions").to_pylist()
    version = Ledger(str(out)).state()[(watcher.embed.stage, "w0")].etag_or_mtime
    assert [(row["slide_id"], row["slide_version"]) for row in table] == [("w0", version)]
    assert abs(table[0]["prob_normal"] + table[0]["prob_tumor"] - 1) < 1e-5
    assert (output / "heatmaps" / "w0.png").stat().st_size > 0
    # A restarted scorer knows what was scored; only a new version of the slide is scored again.
    restarted = NewSlideScorer(trained_run, features, str(output))
    assert restarted({"w0": version}) == 1 and len(list((output / "predictions").iterdir())) == 1
    assert restarted({"w0": "another-version"}) == 2 and len(list((output / "predictions").iterdir())) == 2


def test_slides_truncated_or_deleted_while_processed_are_never_committed_wrong(
    ray_local, small_slides, tmp_path
):
    slides, out = tmp_path / "in", tmp_path / "out"
    slides.mkdir()
    for name in ("w1.svs", "w2.svs", "w3.svs"):
        shutil.copy(small_slides / name, slides / name)
    watcher = _watcher(slides, out)
    assert watcher.step() is False
    ready = watcher.poll()
    assert sorted(s.slide_id for s in ready) == ["w1", "w2", "w3"]

    # Between the listing and the reading: one slide is truncated, one deleted.
    data = (slides / "w1.svs").read_bytes()
    (slides / "w1.svs").write_bytes(data[: len(data) // 3])
    (slides / "w2.svs").unlink()
    watcher.burst(ready)

    entries = _entries(out, watcher)
    assert {e.status for e in entries["w3"].values()} == {"ok"}
    for slide_id in ("w1", "w2"):
        assert {e.status for e in entries[slide_id].values()} == {"failed"}, slide_id
        assert all(not e.permanent for e in entries[slide_id].values()), "a vanished version is retried"
    assert "changed since discovery" in entries["w1"][watcher.stages[0]].error
    assert sorted(p.stem for p in (out / watcher.embed.stage).glob("*.parquet")) == ["w3"]

    # The truncated file is a new version: after holding still it is processed (and fails as broken);
    # the deleted one is simply gone. Nothing is ever committed as ok from a broken file.
    assert watcher.step() is False and watcher.status.waiting == 1
    assert watcher.step() is True
    entries = _entries(out, watcher)
    truncated = next(s for s in discover_slides(str(slides), [".svs"]).slides if s.slide_id == "w1")
    assert entries["w1"][watcher.stages[0]].etag_or_mtime == truncated.fingerprint
    assert {e.status for e in entries["w1"].values()} == {"failed"}
    assert all(e.permanent for e in entries["w1"].values())
    _assert_bag_matches_tiles(out, watcher, "w3")
    assert watcher.step() is False, "permanent failures of an unchanged file are not retried"


def test_writer_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path):
    second = WriterLock(str(tmp_path), "watch", ttl_s=60)
    with (
        WriterLock(str(tmp_path), "watch", ttl_s=60),
        pytest.raises(WriterLockError, match="held by a running `slidestream watch`"),
    ):
        second.acquire()
    assert not (tmp_path / "writer.lock").exists(), "a released lock is removed"

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    holder = json.dumps(
        {
            "owner": "x",
            "command": "watch",
            "host": socket.gethostname(),
            "pid": int(dead.stdout),
            "heartbeat": 1e12,
        }
    )
    (tmp_path / "writer.lock").write_text(holder)
    with WriterLock(str(tmp_path), "watch", ttl_s=60) as lock:  # its process is gone: stale
        assert json.loads((tmp_path / "writer.lock").read_text())["owner"] == lock.owner


def _slidestream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "slidestream.cli", *args], env=ENV, capture_output=True, text=True, timeout=120
    )


def test_watch_refuses_bad_input_before_starting(small_slides, trained_run, tmp_path, capsys):
    def refused(*args: str) -> str:
        assert main(["watch", "--out", str(tmp_path / "out"), *args]) == 2
        return capsys.readouterr().err

    common = ("--encoder", "resnet18_trunc", "--weights", "random")
    assert "slide source not found" in refused("--slides", str(tmp_path / "nowhere"), *common)
    assert "watch.interval_s" in refused("--slides", str(small_slides), *common, "--interval", "0")
    not_a_run = refused("--slides", str(small_slides), *common, "--model", str(tmp_path))
    assert "is not a training run" in not_a_run
    other_encoder = ("--encoder", "resnet50_trunc", "--weights", "random", "--model", trained_run)
    assert "trained on 256-d features, but the bags" in refused("--slides", str(small_slides), *other_encoder)
    absent = str(tmp_path / "absent.pt")
    assert "absent.pt" in refused(
        "--slides", str(small_slides), "--encoder", "resnet18_trunc", "--weights", absent
    )
    assert not (tmp_path / "out").exists(), "refused runs write nothing"


# ------------------------------------------------------------------------------ the command, end to end


def _watch_command(slides: str, out: str, status: Path) -> list[str]:
    command = [sys.executable, "-m", "slidestream.cli", "watch", "--slides", slides, "--out", out]
    command += ["--encoder", "resnet18_trunc", "--weights", "random", "--json-status", str(status)]
    for setting in (*SETTINGS, "watch.status_every_s=0", "ray.num_cpus=2", "ray.object_store_mb=512"):
        command += ["--set", setting]
    return command


def _status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"watch exited (code {proc.returncode}) before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def _watching(slides: str, out: str, status: Path, log: Path, env: dict | None = None):
    """A `slidestream watch` process; the caller stops it with SIGTERM (killed outright on failure)."""
    with open(log, "ab") as sink:
        proc = subprocess.Popen(
            _watch_command(slides, out, status),
            env=env or ENV,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _sigterm(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]


def _ok(out: str, stage: str) -> dict[str, LedgerEntry]:
    return {e.slide_id: e for e in Ledger(out).entries(stage) if e.status == "ok"}


def test_watch_sigterm_mid_burst_then_restart_commits_every_slide_once(ray_local, small_slides, tmp_path):
    slides, out, status, log = tmp_path / "in", tmp_path / "out", tmp_path / "status.json", tmp_path / "log"
    # the watchers are drivers on this session's Ray instance, as on a cluster
    env = session_driver_env()
    slides.mkdir()
    for i in range(4):  # the first burst
        shutil.copy(small_slides / f"w{i}.svs", slides / f"w{i}.svs")
    stage = EmbedStage(
        "resnet18_trunc", "random", make_config(*SETTINGS).tiling, make_config(*SETTINGS).embed
    )
    features = out / stage.stage

    with _watching(str(slides), str(out), status, log, env) as proc:
        _wait_for(lambda: _status(status).get("slides", {}).get("committed", 0) >= 1, proc, "a first commit")
        _sigterm(proc, log)  # mid-burst: the slides not yet committed are left for the next start
    first = _status(status)
    assert first["state"] == "stopped" and 1 <= first["slides"]["committed"] < 4, first
    committed = _ok(str(out), stage.stage)
    assert len(committed) == first["slides"]["committed"]
    assert {p.stem for p in features.glob("*.parquet")} == set(committed), "an uncommitted bag is visible"
    assert not (out / "writer.lock").exists()

    shutil.copy(small_slides / "w4.svs", slides / "w4.svs")  # arrives while nobody watches
    with _watching(str(slides), str(out), status, log, env) as proc:
        _wait_for(lambda: len(_ok(str(out), stage.stage)) == 5, proc, "every slide committed")
        second_writer = _slidestream(*_watch_command(str(slides), str(out), tmp_path / "s2.json")[3:])
        assert (
            second_writer.returncode == 2 and "held by a running `slidestream watch`" in second_writer.stderr
        )
        _sigterm(proc, log)

    final = _ok(str(out), stage.stage)
    assert sorted(final) == ["w0", "w1", "w2", "w3", "w4"]
    assert all(final[s].committed_at == committed[s].committed_at for s in committed), "processed twice"
    second = _status(status)
    assert second["slides"]["committed"] == 5 - len(committed) and second["slides"]["failed"] == 0
    assert second["latency_s"]["p50"] > 0 and second["latency_s"]["p95"] >= second["latency_s"]["p50"]
    config = make_config(*SETTINGS)
    tiles = _ok(str(out), tiles_stage(config.tiling))
    bags = FeatureBags(str(features))
    assert sorted(bags.slide_ids) == sorted(final)
    for slide_id in final:
        coords = bags.load(slide_id).coords.numpy()
        assert len(coords) == len({tuple(c) for c in coords}) == tiles[slide_id].n_tiles, slide_id
    committed_samples(str(out), config)  # fails on a tile committed twice
    assert "watch stopped:" in log.read_text()


@pytest.fixture()
def private_s3(tmp_path_factory):
    """An S3 server of this test's own: stopping its gateway disturbs no other test."""
    workdir = Path(tempfile.mkdtemp(prefix="ss-w-"))  # short: Ceph admin sockets need short paths
    server = start_s3_server(workdir)
    yield server
    stop_s3_server(server)
    shutil.rmtree(workdir, ignore_errors=True)


def test_watch_on_object_storage_rides_out_an_outage(ray_local, private_s3, small_slides, tmp_path):
    server = private_s3
    server.make_bucket("watch-in")
    server.make_bucket("watch-out")
    s3 = server.client()
    for i in range(2):
        s3.upload_file(str(small_slides / f"w{i}.svs"), "watch-in", f"p/w{i}.svs")
    # Two attempts per request: the outage surfaces in seconds, not after minutes of botocore backoff.
    # The watcher is a driver on this session's Ray.
    env = session_driver_env()
    env.update(server.env(), AWS_MAX_ATTEMPTS="2")
    slides, out, status, log = (
        "s3://watch-in/p",
        "s3://watch-out/o",
        tmp_path / "status.json",
        tmp_path / "log",
    )
    stage = EmbedStage(
        "resnet18_trunc", "random", make_config(*SETTINGS).tiling, make_config(*SETTINGS).embed
    )

    saved = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())  # this process reads the ledger from the same server
    try:
        with _watching(slides, out, status, log, env=env) as proc:
            _wait_for(lambda: _status(status).get("slides", {}).get("committed", 0) >= 1, proc, "a commit")
            server.stop_gateway()
            try:
                _wait_for(lambda: _status(status).get("errors", 0) >= 1, proc, "the outage to be noticed")
            finally:
                server.start_gateway()
            for i in (2, 3):
                s3.upload_file(str(small_slides / f"w{i}.svs"), "watch-in", f"p/w{i}.svs")
            _wait_for(lambda: len(_ok(out, stage.stage)) == 4, proc, "every slide committed after the outage")
            _sigterm(proc, log)
        final = _ok(out, stage.stage)
        assert sorted(final) == ["w0", "w1", "w2", "w3"]
        got = _status(status)
        assert got["errors"] >= 1 and got["state"] == "stopped"
        tiles = _ok(out, tiles_stage(make_config(*SETTINGS).tiling))
        bags = FeatureBags(f"{out}/{stage.stage}")
        for slide_id in final:
            coords = bags.load(slide_id).coords.numpy()
            assert len(coords) == len({tuple(c) for c in coords}) == tiles[slide_id].n_tiles, slide_id
        committed_samples(out, make_config(*SETTINGS))
        assert server.secret_key not in log.read_text() + status.read_text()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
