"""A head and two worker nodes on one machine: tiles come from several nodes, and losing a node mid-run
still commits every slide exactly once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from slidestream.cluster.runtime import ensure_ray
from slidestream.pipelines.ingest import run_ingest
from slidestream.testing.helpers import committed_samples, make_config

SETTINGS = ("tiling.tile_px=64", "shards.max_tiles=150")


@pytest.fixture()
def three_nodes(s3_server):
    ray.shutdown()  # the session's single-node instance makes way for the cluster
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 300 * 2**20}
    )
    workers = [cluster.add_node(num_cpus=1, object_store_memory=300 * 2**20) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _remove_after_first_commit(cluster: Cluster, node, ledger_dir: Path, removed: threading.Event) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if ledger_dir.is_dir() and any("-commit-" in p.name for p in ledger_dir.iterdir()):
            cluster.remove_node(node, allow_graceful=False)
            removed.set()
            return
        time.sleep(0.05)


def test_worker_node_lost_mid_run_commits_exactly_once(three_nodes, slide_root, tmp_path):
    cluster, workers = three_nodes
    config = make_config(*SETTINGS)
    ensure_ray(config.ray)  # sets the Data limits on the connected cluster

    spread = run_ingest(str(slide_root), str(tmp_path / "spread"), config)
    assert len(spread.nodes) > 1, "tiles should be produced on more than one node"
    expected = committed_samples(str(tmp_path / "spread"), config)

    out = tmp_path / "lossy"
    removed = threading.Event()
    killer = threading.Thread(
        target=_remove_after_first_commit, args=(cluster, workers[0], out / "ledger", removed), daemon=True
    )
    killer.start()
    report = run_ingest(str(slide_root), str(out), config)
    killer.join(timeout=5)
    assert removed.is_set(), "the node removal must happen during the run"
    assert len(report.ok) == 4 and not report.failed, report.summary()
    got = committed_samples(str(out), config)
    assert got.keys() == expected.keys()
    assert all(got[key]["jpg"] == expected[key]["jpg"] for key in expected)
