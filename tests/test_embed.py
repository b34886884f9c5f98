"""`run`: ingest and embed in one pass; bags equal the encoder applied directly to the same tiles."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from slidestream.cluster.config import Config
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import join
from slidestream.pipelines.embed import EmbedStage, run_embed, with_input_px
from slidestream.pipelines.encoders import build_encoder
from slidestream.pipelines.features import FeatureBags
from slidestream.pipelines.formats.choose import open_handle
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.reader import read_tiles, resize_tile
from slidestream.pipelines.stream import IngestReport
from slidestream.pipelines.tiling import read_plan
from slidestream.testing.helpers import committed_samples, make_config

# Windows of 3 slides: the 4 slides of a run go through as two Ray Data datasets.
SETTINGS = ("tiling.tile_px=128", "embed.input_px=64", "embed.dtype=float32", "ingest.window_slides=3")


def _stage(config) -> EmbedStage:
    return EmbedStage("resnet18_trunc", "random", config.tiling, config.embed)


@dataclass
class Embedded:
    out: str
    config: Config
    embed: EmbedStage
    report: IngestReport


@pytest.fixture(scope="module")
def embedded(s3_server, slide_root, tmp_path_factory) -> Embedded:
    """The slides ingested and embedded once; tests that add to `out` leave this stage as it is."""
    config = make_config(*SETTINGS)
    ensure_ray(config.ray)
    out = str(tmp_path_factory.mktemp("embedded") / "out")
    embed = _stage(config)
    return Embedded(out, config, embed, run_ingest(str(slide_root), out, config, embed=embed))


def test_run_writes_bags_equal_to_direct_encoding(ray_local, embedded, slide_root):
    out, config, embed, report = embedded.out, embedded.config, embedded.embed, embedded.report
    assert len(report.ok) == 4 and not report.failed, report.summary()

    bags = FeatureBags(join(out, embed.stage), str(slide_root / "labels.csv"))
    assert bags.slide_ids == sorted(report.ok) and bags.dim == 256 and bags.encoder == embed.info.key
    tiles_entries = {e.slide_id: e for e in Ledger(out).entries(report.stage)}
    feature_entries = {e.slide_id: e for e in Ledger(out).entries(embed.stage)}
    assert all(feature_entries[s].status == "ok" for s in report.ok)

    bag = bags.load("slide_001")
    assert len(bag.features) == tiles_entries["slide_001"].n_tiles
    keys = {f"slide_001/{x}_{y}" for x, y in bag.coords.tolist()}
    assert keys == {k for k in committed_samples(out, config) if k.startswith("slide_001/")}

    # The same tiles, read and encoded directly in this process.
    uri = str(slide_root / "slide_001.svs")
    slide = open_handle(uri)
    plan = read_plan(tiles_entries["slide_001"].mpp, slide.level_downsamples, config.tiling)
    xs, ys = bag.coords[:, 0].tolist(), bag.coords[:, 1].tolist()
    pixels = np.stack([resize_tile(t, 64) for t in read_tiles(slide, xs, ys, plan)])
    encoder = build_encoder("resnet18_trunc", "random", seed=0)
    encoder.info = with_input_px(encoder.info, 64)
    direct = encoder.embed(pixels, batch_size=32)
    np.testing.assert_allclose(bag.features.numpy(), direct, rtol=1e-4, atol=1e-4)

    again = run_ingest(str(slide_root), out, config, embed=embed)
    assert again.skipped_unchanged == 4 and not again.ok


def _kill_an_encoder_actor(ledger_dir, killed: list[int]) -> None:
    """SIGKILL the encoder actor's process once the first slide is committed."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if ledger_dir.is_dir() and any("-commit-" in p.name for p in ledger_dir.iterdir()):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if "EmbedActor" in " ".join(proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(proc.info["pid"])
                    return
        time.sleep(0.05)


def test_killed_encoder_actor_loses_and_duplicates_nothing(ray_local, slide_root, tmp_path):
    config = make_config(*SETTINGS, "shards.max_tiles=40")
    out = tmp_path / "out"
    embed = _stage(config)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_an_encoder_actor, args=(out / "ledger", killed), daemon=True)
    killer.start()
    report = run_ingest(str(slide_root), str(out), config, embed=embed)
    killer.join(timeout=5)
    assert killed, "an encoder actor must be killed during the run"
    assert len(report.ok) == 4 and not report.failed, report.summary()
    bags = FeatureBags(join(str(out), embed.stage), str(slide_root / "labels.csv"))
    tiles = {e.slide_id: e.n_tiles for e in Ledger(str(out)).entries(report.stage)}
    for bag in bags:
        coords = [tuple(c) for c in bag.coords.tolist()]
        assert len(coords) == len(set(coords)) == tiles[bag.slide_id], bag.slide_id
    assert not list((out / embed.stage / "_parts").glob("*")), "chunk parts must be merged and removed"


def test_embed_from_shards_writes_a_separate_key(ray_local, embedded, slide_root, tmp_path):
    out, first = embedded.out, embedded.embed
    first_dir = Path(out) / first.stage
    before = {p.name: p.read_bytes() for p in first_dir.glob("*.parquet")}

    second_config = make_config(*SETTINGS, "embed.seed=1")
    second = EmbedStage("resnet18_trunc", "random", second_config.tiling, second_config.embed)
    assert second.stage != first.stage
    report = run_embed(out, second_config, second)
    assert sorted(report.ok) == sorted(n.removesuffix(".parquet") for n in before), report.summary()
    assert {p.name: p.read_bytes() for p in first_dir.glob("*.parquet")} == before  # untouched

    one, two = FeatureBags(join(out, first.stage)), FeatureBags(join(out, second.stage))
    a, b = one.load("slide_000"), two.load("slide_000")
    assert a.coords.tolist() == b.coords.tolist()
    assert not np.allclose(a.features.numpy(), b.features.numpy())  # other weights, other features
    # Features from the JPEG shards are close to those computed from the slide's own pixels.
    second_direct = run_ingest(str(slide_root), str(tmp_path / "direct"), second_config, embed=second)
    assert len(second_direct.ok) == 4
    c = FeatureBags(join(str(tmp_path / "direct"), second.stage)).load("slide_000")
    cos = np.sum(b.features.numpy() * c.features.numpy(), 1) / (
        np.linalg.norm(b.features.numpy(), axis=1) * np.linalg.norm(c.features.numpy(), axis=1)
    )
    assert cos.min() > 0.98
    assert run_embed(out, second_config, second).skipped_unchanged == 4
