"""Object-storage settings: the retry policy follows the standard AWS variables, checked before use."""

from __future__ import annotations

import socket
import time

import pytest
from botocore.exceptions import EndpointConnectionError

from slidestream.cluster.storage import DEFAULT_MAX_ATTEMPTS, filesystem, storage_options


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_retry_policy_defaults_and_follows_the_aws_variables(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    retries = storage_options("s3://b/p")["config_kwargs"]["retries"]
    assert retries == {"max_attempts": DEFAULT_MAX_ATTEMPTS, "mode": "adaptive"}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    assert storage_options("s3://b/p")["config_kwargs"]["retries"] == {"max_attempts": 2, "mode": "standard"}
    assert storage_options("/local/dir") == {}
    for name, value in (("AWS_MAX_ATTEMPTS", "0"), ("AWS_MAX_ATTEMPTS", "many"), ("AWS_RETRY_MODE", "eager")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            storage_options("s3://b/p")
        monkeypatch.setenv(name, {"AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}[name])


def test_one_attempt_fails_fast_on_an_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fs, path = filesystem("s3://nowhere/p")
    start = time.monotonic()
    with pytest.raises(EndpointConnectionError):
        fs.ls(path)
    assert time.monotonic() - start < 30  # the default policy keeps retrying for minutes
