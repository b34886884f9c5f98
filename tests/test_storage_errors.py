"""Object-storage errors as a user sees them, against the real S3 server: wrong secret, unknown key, no
credentials, a missing bucket or prefix, access denied, a stopped server. Each is one line on stderr that
names the URI and what to check, exit 2, no traceback, no secret; none of them starts Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from slidestream.cluster.storage_errors import StorageAccessError, check_storage, storage_access
from slidestream.testing.s3server import S3Server, start_s3_server, stop_s3_server

BUCKET = "storage-errors"
CREDENTIALS = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:
    s3_server.make_bucket(BUCKET)
    s3_server.client().put_object(Bucket=BUCKET, Key="slides/notes.txt", Body=b"not a slide")
    return BUCKET


def _env(server: S3Server, tmp_path: Path, **changes: str | None) -> dict[str, str]:
    """The server's environment, with no AWS config files or instance metadata to fall back on."""
    env = {**os.environ, **server.env(), "SLIDESTREAM_PROGRESS": "0", "HOME": str(tmp_path)}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.pop("AWS_PROFILE", None)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _slidestream(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "slidestream.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return done, time.monotonic() - start


def _one_line(done: subprocess.CompletedProcess, command: str, uri: str, *secrets: str) -> str:
    """The single stderr line of a refused command; exit 2, nothing done, nothing secret."""
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # nothing ran: no Ray, no summary
    line = lines[0]
    assert line.startswith(f"slidestream {command}: cannot access {uri}: "), line
    for secret in secrets:
        assert secret not in done.stdout + done.stderr
    return line


def test_wrong_secret_and_unknown_key_are_invalid_credentials(s3_server, bucket, tmp_path):
    slides, out = f"s3://{bucket}/slides", f"s3://{bucket}/out"
    wrong_secret = "not-the-secret-" + uuid.uuid4().hex
    done, _ = _slidestream(
        _env(s3_server, tmp_path, AWS_SECRET_ACCESS_KEY=wrong_secret),
        "ingest",
        "--slides",
        slides,
        "--out",
        out,
    )
    line = _one_line(done, "ingest", slides, wrong_secret, s3_server.secret_key)
    assert "the credentials are not valid for" in line and "SignatureDoesNotMatch" in line
    assert CREDENTIALS in line and s3_server.endpoint in line

    done, _ = _slidestream(
        _env(s3_server, tmp_path, AWS_ACCESS_KEY_ID="NOSUCHKEY" + uuid.uuid4().hex[:11].upper()),
        "status",
        "--out",
        out,
    )
    line = _one_line(done, "status", out, s3_server.secret_key)
    assert "the credentials are not valid for" in line and "InvalidAccessKeyId" in line


def test_no_credentials_at_all(s3_server, bucket, tmp_path):
    slides = f"s3://{bucket}/slides"
    env = _env(s3_server, tmp_path, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    done, _ = _slidestream(env, "ingest", "--slides", slides, "--out", f"s3://{bucket}/out")
    line = _one_line(done, "ingest", slides)
    assert line.endswith(f"no S3 credentials found: set {CREDENTIALS}")


def test_missing_bucket_and_missing_prefix(s3_server, bucket, tmp_path):
    env = _env(s3_server, tmp_path)
    out = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/out"
    done, _ = _slidestream(env, "ingest", "--slides", f"s3://{bucket}/slides", "--out", out)
    line = _one_line(done, "ingest", out, s3_server.secret_key)
    assert f"bucket '{out[5:].split('/')[0]}' does not exist at {s3_server.endpoint}" in line

    # The bucket is there, the prefix is not: the discovery's own one line (before Ray starts too).
    slides = f"s3://{bucket}/no-such-prefix"
    done, _ = _slidestream(env, "ingest", "--slides", slides, "--out", f"s3://{bucket}/out")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"slidestream ingest: slide source not found: {slides}\n"


def _user_without_access(server: S3Server) -> tuple[str, str, str]:
    """Keys of a second S3 user of the server, who owns nothing and was granted nothing."""
    if not server.managed or server.workdir is None:
        pytest.skip("an external S3 server: no second user can be made")
    uid = f"no-access-{uuid.uuid4().hex[:8]}"
    conf = str(server.workdir / "ceph.conf")
    made = subprocess.run(
        ["radosgw-admin", "-c", conf, "user", "create", f"--uid={uid}", f"--display-name={uid}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, f"radosgw-admin user create failed (exit {made.returncode})"
    key = json.loads(made.stdout)["keys"][0]
    return uid, key["access_key"], key["secret_key"]


def test_access_denied_to_another_users_bucket(s3_server, bucket, tmp_path, monkeypatch):
    uid, access, secret = _user_without_access(s3_server)
    env = _env(s3_server, tmp_path, AWS_ACCESS_KEY_ID=access, AWS_SECRET_ACCESS_KEY=secret)
    slides = f"s3://{bucket}/slides"
    done, _ = _slidestream(env, "ingest", "--slides", slides, "--out", f"s3://{bucket}/out")
    line = _one_line(done, "ingest", slides, secret, s3_server.secret_key)
    assert line.endswith(f"access denied: the credentials lack permission to list bucket '{bucket}'")

    # Granted reading one object but not listing the bucket: that object passes the check, the rest not.
    readable = f"{bucket}/slides/notes.txt"
    grant = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": [f"arn:aws:iam:::user/{uid}"]},
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{readable}"],
            }
        ],
    }
    s3_server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(grant))
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        check_storage(f"s3://{readable}")
        with pytest.raises(StorageAccessError, match="lack permission to list"):
            check_storage(f"s3://{bucket}/slides/other.txt")
    finally:
        s3_server.client().delete_bucket_policy(Bucket=bucket)


@pytest.fixture()
def stopped_s3():
    """An S3 server of this test's own whose gateway is stopped: no other test loses its server."""
    workdir = Path(tempfile.mkdtemp(prefix="ss-e-"))  # short: Ceph admin sockets need short paths
    server = start_s3_server(workdir)
    if not server.managed:
        pytest.skip("an external S3 server cannot be stopped from the tests")
    try:
        server.make_bucket("stopped")
        server.stop_gateway()
        yield server
    finally:
        stop_s3_server(server)
        shutil.rmtree(workdir, ignore_errors=True)


def test_stopped_server_is_one_line_in_seconds(stopped_s3, tmp_path):
    """botocore would try 8 times (adaptive); the pre-flight check gives up after 3 short attempts."""
    slides = "s3://stopped/slides"
    done, seconds = _slidestream(
        _env(stopped_s3, tmp_path), "ingest", "--slides", slides, "--out", "s3://stopped/o"
    )
    line = _one_line(done, "ingest", slides, stopped_s3.secret_key)
    assert line.endswith(
        f"no answer from {stopped_s3.endpoint}: is it running and reachable? (check AWS_ENDPOINT_URL)"
    )
    assert seconds < 60, seconds


def test_what_is_not_a_storage_error_we_know_is_raised_unchanged():
    """An internal error keeps its traceback (the command line's side: tests/test_cli.py)."""
    with pytest.raises(KeyError), storage_access("s3://b/k"):
        raise KeyError("internal")
    unknown = ClientError({"Error": {"Code": "InternalError", "Message": "boom"}}, "ListObjectsV2")
    with pytest.raises(OSError, match="boom") as raised, storage_access("s3://b/k"):
        raise OSError(5, "boom") from unknown  # as s3fs translates an error it has no name for
    assert raised.value.__cause__ is unknown
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ListObjectsV2")
    with (
        pytest.raises(StorageAccessError, match="lack permission to read bucket 'b'"),
        storage_access("s3://b/k"),
    ):
        raise PermissionError("no") from denied
