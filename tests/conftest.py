"""Shared fixtures: a real S3 server (Ceph RGW on loopback), a real local Ray instance, real slides."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import ray

os.environ.setdefault("SLIDESTREAM_PROGRESS", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from slidestream.cluster.runtime import ensure_ray
from slidestream.pipelines.synthetic import write_dataset
from slidestream.testing.encoder import pretrained_encoder
from slidestream.testing.helpers import make_config
from slidestream.testing.s3server import S3Server, start_s3_server, stop_s3_server


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """The S3 server; its endpoint and credentials are put in the environment (and never printed)."""
    server = start_s3_server()
    saved = {name: os.environ.get(name) for name in server.env()}
    os.environ.update(server.env())
    yield server
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    stop_s3_server(server)


@pytest.fixture()
def ray_local(s3_server: S3Server) -> None:
    """A local Ray instance that knows the S3 endpoint (started once; restarted if a test stopped it)."""
    ensure_ray(make_config().ray)
    yield


@pytest.fixture(scope="session")
def slide_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny synthetic SVS slides (two positive) with labels.csv and masks, written once."""
    root = tmp_path_factory.mktemp("slides")
    write_dataset(str(root), 4, seed=7, size="tiny", fmt="svs")
    return root


@pytest.fixture(scope="session")
def pretrained_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`resnet10t_64` pretrained on a synthetic cohort of its own (seed 1000), trained once per session."""
    return pretrained_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture()
def slide_copy(slide_root: Path, tmp_path: Path) -> Path:
    """A private copy of the slides that a test may modify."""
    target = tmp_path / "slides"
    shutil.copytree(slide_root, target)
    return target


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if ray.is_initialized():
        ray.shutdown()
