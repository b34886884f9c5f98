"""`slidestream train icmil` end to end on synthetic slides (light encoder, small tiles): round 0 and one
coupled round with a 2-worker Ray Train fine-tuning, new features under a new key, metrics side by side;
then a rerun after a crash between steps resumes at that step, and other settings are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from slidestream.cli import main
from slidestream.pipelines.encoders import EncoderError, build_encoder
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.synthetic import write_dataset
from slidestream.testing.helpers import make_config
from slidestream.trainers.icmil.rounds import ICMILRun

# Tiny on purpose: 6 slides at 2 µm/px (≈ 20 tiles each), 32 px encoder input, few epochs and tiles.
SETTINGS = (
    "tiling.mpp=2.0",
    "tiling.tile_px=128",
    "embed.input_px=32",
    "train.workers=0",
    "train.epochs=3",
    "train.min_epochs=1",
    "train.parallel_folds=1",
    "icmil.workers=2",
    "icmil.cpus_per_worker=1",
    "icmil.batch_size=16",
    "icmil.tiles_per_epoch=64",
    "icmil.val_tiles=16",
)
# One fixed split (a `split` column): every part holds one slide of each class.
SPLIT = {
    "slide_000": (0, "train"), "slide_001": (1, "train"), "slide_004": (0, "val"),
    "slide_002": (1, "val"), "slide_005": (0, "test"), "slide_003": (1, "test"),
}  # fmt: skip


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, s3_server) -> tuple[Path, Path]:
    from slidestream.cluster.runtime import ensure_ray

    root = tmp_path_factory.mktemp("icmil")
    made = write_dataset(str(root / "slides"), 6, seed=3, size="tiny", fmt="svs")
    assert sorted(zip(made.slide_ids, made.labels, strict=True)) == sorted(
        (s, label) for s, (label, _) in SPLIT.items()
    )
    labels = root / "labels.csv"
    labels.write_text("slide_id,label,split\n" + "".join(f"{s},{y},{p}\n" for s, (y, p) in SPLIT.items()))
    config = make_config(*SETTINGS)
    ensure_ray(config.ray)
    report = run_ingest(str(root / "slides"), str(root / "out"), config)
    assert len(report.ok) == 6, report.summary()
    return root / "out", labels


def _cli(out: Path, labels: Path, *extra: str) -> int:
    args = ["train", "icmil", "--name", "icm", "--out", str(out), "--labels", str(labels)]
    args += ["--encoder", "resnet18_trunc", "--weights", "random", "--rounds", "1", "--set", "ray.num_cpus=2"]
    for setting in (*SETTINGS, *extra):
        args += ["--set", setting]
    return main(args)


def _features(features_dir: str, slide_id: str) -> np.ndarray:
    table = pq.read_table(Path(features_dir) / f"{slide_id}.parquet")
    return np.stack(table.column("feature").to_numpy(zero_copy_only=False)).astype(np.float32)


def _mtimes(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def test_icmil_round_trip_and_resume(ingested, ray_local, capsys):
    out, labels = ingested
    assert _cli(out, labels) == 0
    printed = capsys.readouterr().out
    run_dir = out / "runs" / "icm"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert metrics["fold"] == 0 and metrics["model"] == "abmil"
    for row in metrics["rounds"]:
        assert 0.0 <= row["auc"] <= 1.0 and 0.0 <= row["acc"] <= 1.0
    assert metrics["rounds"][1]["distill_tiles_per_s"] > 0
    with Image.open(run_dir / "rounds.png") as png:
        assert png.width > 300 and png.height > 200
    assert "round 1 distill" in printed and "encoder key" in printed

    # Round 1's features live under another key (the fine-tuned weights' digest) and differ.
    r0 = json.loads((run_dir / "round-0" / "manifest.json").read_text())
    r1 = json.loads((run_dir / "round-1" / "manifest.json").read_text())
    assert r0["embed"]["encoder_key"] != r1["embed"]["encoder_key"]
    assert r0["embed"]["features"] != r1["embed"]["features"]
    assert r1["embed"]["weights"] == r1["distill"]["weights"]
    for slide_id in SPLIT:
        a, b = _features(r0["embed"]["features"], slide_id), _features(r1["embed"]["features"], slide_id)
        assert a.shape == b.shape and not np.allclose(a, b), slide_id

    # The fine-tuned weights are a plain state dict the encoders module loads, and they moved.
    state = torch.load(r1["distill"]["weights"], map_location="cpu", weights_only=True)
    start = build_encoder("resnet18_trunc", "random", 0).model.state_dict()
    assert set(state) == set(start)
    assert any(not torch.equal(state[k], start[k]) for k in start if k.endswith("weight"))
    assert build_encoder("resnet18_trunc", r1["distill"]["weights"]).info.key.endswith(
        r1["embed"]["encoder_key"].split("-")[1]
    )

    # Fine-tuning streamed the training slides' shards only.
    config = make_config(*SETTINGS)
    job = ICMILRun("icm", str(out), str(labels), "resnet18_trunc", "random", config, 1).distill_job(1)
    train_slides = {s for s, (_, part) in SPLIT.items() if part == "train"}
    assert job.train_shards and {Path(u).name.split("-")[1] for u in job.train_shards} == train_slides
    assert {Path(u).name.split("-")[1] for u in job.val_shards} == {"slide_002", "slide_004"}

    # A crash between round 1's embed and its MIL step leaves the manifest without "mil" and a partial
    # MIL run: the rerun redoes only that step.
    del r1["mil"]
    (run_dir / "round-1" / "manifest.json").write_text(json.dumps(r1))
    shutil.rmtree(run_dir / "round-1" / "mil" / "jobs")
    (run_dir / "metrics.json").unlink()
    kept = {
        "round-0": _mtimes(run_dir / "round-0"),
        "distill": _mtimes(run_dir / "round-1" / "distill"),
        "features": _mtimes(Path(r1["embed"]["features"])),
    }
    assert _cli(out, labels) == 0
    printed = capsys.readouterr().out
    assert "round 1 mil" in printed and "round 1 distill" not in printed and "round 0" not in printed
    assert _mtimes(run_dir / "round-0") == kept["round-0"]
    assert _mtimes(run_dir / "round-1" / "distill") == kept["distill"]
    assert _mtimes(Path(r1["embed"]["features"])) == kept["features"]
    again = json.loads((run_dir / "round-1" / "manifest.json").read_text())
    assert set(again) == {"distill", "embed", "mil"}
    assert (run_dir / "round-1" / "mil" / "jobs" / "mil-s0-f0" / "weights.pt").is_file()
    assert [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]] == [0, 1]

    # Other settings under the same name are refused, naming the setting.
    assert _cli(out, labels, "icmil.lr=0.001") == 2
    assert "icmil.lr" in capsys.readouterr().err


def test_icmil_never_implies_random_init(tmp_path: Path, capsys):
    """The tile embedder starts from the weights the user names (the paper: ImageNet): without --weights
    the command stops and names the flag and the explicit 'random'; the run itself refuses no weights."""
    args = ["train", "icmil", "--name", "r", "--out", str(tmp_path), "--labels", "l.csv"]
    assert main([*args, "--encoder", "resnet18_trunc"]) == 2
    err = capsys.readouterr().err
    assert "needs" in err and "--weights (a local file, or 'random')" in err
    with pytest.raises(EncoderError, match="random weights are never implied"):
        ICMILRun("r", str(tmp_path), "l.csv", "resnet18_trunc", None, make_config(), 1)  # type: ignore[arg-type]
