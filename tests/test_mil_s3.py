"""A MIL run whose feature bags, labels, checkpoints and results all live in the real S3 server."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from slidestream.cluster.storage import filesystem, read_bytes
from slidestream.testing.bags import write_bags
from slidestream.testing.helpers import make_config
from slidestream.trainers.mil.predict import predict_run
from slidestream.trainers.mil.runner import run_training


def test_training_reads_and_writes_object_storage(ray_local, s3_server, tmp_path):
    labels_local = write_bags(
        str(tmp_path), n_slides=16, dim=16, n_instances=(10, 30), seed=3, witness_frac=0.2
    )
    s3_server.make_bucket("mil-data")
    fs, _ = filesystem("s3://mil-data")
    fs.put(str(tmp_path / "features"), "mil-data/features", recursive=True)
    fs.put_file(labels_local, "mil-data/labels.csv")
    config = make_config("train.folds=2", "train.epochs=3", "train.min_epochs=1", "train.workers=1")

    out = "s3://mil-data/out"
    summary = run_training("mil", "s3run", out, "s3://mil-data/features", "s3://mil-data/labels.csv", config)

    metrics = json.loads(read_bytes(f"{out}/runs/s3run/metrics.json"))
    assert [row["fold"] for row in metrics["folds"]] == [0, 1]
    assert metrics == summary.metrics
    checkpoints = fs.glob("mil-data/out/runs/s3run/ray/mil-s0-f*/checkpoint_*/state.pt")
    assert len({c.split("/")[-3] for c in checkpoints}) == 2, checkpoints  # both folds checkpointed on S3
    predictions = fs.open("mil-data/out/runs/s3run/predictions.parquet", "rb")
    assert sorted(pq.read_table(predictions).column("slide_id").to_pylist()) == [
        f"slide-{i:03d}" for i in range(16)
    ]

    report = predict_run(f"{out}/runs/s3run", "s3://mil-data/features")
    assert report.n_slides == 16 and report.predictions.startswith("s3://")

    secret = s3_server.secret_key
    for path in fs.find("mil-data/out/runs/s3run"):
        if path.endswith((".json", ".yaml")):
            assert secret not in fs.cat_file(path).decode(errors="ignore"), path
