"""The real S3 test server (Ceph RADOS Gateway on loopback) works with boto3, s3fs and pyarrow.

This module starts its own server in a short temporary directory (module-scoped) and stops it at the
end, so it does not disturb a server shared by the rest of the suite. With SLIDESTREAM_S3_ENDPOINT set,
it uses that server instead (and skips the outage test).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from slidestream.testing.s3server import (
    EXTERNAL_ENDPOINT_VAR,
    S3Server,
    S3ServerError,
    start_s3_server,
    stop_s3_server,
)

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    workdir = Path(tempfile.mkdtemp(prefix="ss-rgw-"))  # short: Ceph admin sockets need short paths
    srv = start_s3_server(workdir)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in srv.env().items():
                mp.setenv(key, value)
            yield srv
    finally:
        stop_s3_server(srv)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def bucket(server: S3Server) -> str:
    name = f"ss-test-{uuid.uuid4().hex[:10]}"  # S3 bucket names: 3-63 chars, lowercase, no '_'
    server.make_bucket(name)
    return name


def test_repr_and_env_hide_nothing_they_should_not(server: S3Server) -> None:
    assert server.secret_key not in repr(server)
    assert server.access_key in repr(server)
    env = server.env()
    assert env["AWS_ENDPOINT_URL"] == server.endpoint
    assert env["AWS_SECRET_ACCESS_KEY"] == server.secret_key
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "WHEN_REQUIRED"
    if server.managed:
        assert server.endpoint == f"http://127.0.0.1:{server.port}"
        keys = server.workdir / "s3-keys"
        assert keys.stat().st_mode & 0o077 == 0


def test_boto3_bucket_and_object(server: S3Server, bucket: str) -> None:
    server.make_bucket(bucket)  # again: already owned -> no error
    s3 = server.client()
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.put_object(Bucket=bucket, Key="dir/hello.txt", Body=b"hello rgw")
    assert s3.get_object(Bucket=bucket, Key="dir/hello.txt")["Body"].read() == b"hello rgw"
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="dir/")["Contents"]]
    assert keys == ["dir/hello.txt"]


def test_s3fs_roundtrip_and_range_read(server: S3Server, bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=server.access_key,
        secret=server.secret_key,
        client_kwargs={"endpoint_url": server.endpoint},
        skip_instance_cache=True,
    )
    data = os.urandom(700_000)
    path = f"{bucket}/blob.bin"
    with fs.open(path, "wb") as f:
        f.write(data)
    assert fs.size(path) == len(data)
    assert fs.cat_file(path) == data

    # A range read through a small block size fetches only what is asked for, at the right offset.
    with fs.open(path, "rb", block_size=64 * 1024) as f:
        f.seek(300_001)
        assert f.read(5_000) == data[300_001:305_001]
        f.seek(-10, os.SEEK_END)
        assert f.read() == data[-10:]
    assert fs.cat_file(path, start=123_456, end=123_556) == data[123_456:123_556]

    # an object written by s3fs is visible to boto3 and vice versa
    server.client().put_object(Bucket=bucket, Key="from-boto3", Body=b"xyz")
    assert fs.cat_file(f"{bucket}/from-boto3") == b"xyz"
    assert server.client().get_object(Bucket=bucket, Key="blob.bin")["ContentLength"] == len(data)


# pyarrow's own S3 client (the AWS C++ SDK) runs in a child process: its threads can crash the process
# that loaded it at interpreter exit (apache/arrow#38352), which for pytest's process fails the whole suite
# after every test passed. slidestream itself reaches S3 through fsspec, also from pyarrow.
_PYARROW_ROUNDTRIP = """
import os, sys
import pyarrow as pa, pyarrow.fs as pafs, pyarrow.parquet as pq

scheme, host = os.environ["AWS_ENDPOINT_URL"].split("://", 1)
fs = pafs.S3FileSystem(endpoint_override=host, scheme=scheme, region=os.environ["AWS_DEFAULT_REGION"])
table = pa.table({"slide": ["a", "b", "c"], "x": [1, 2, 3], "emb": [[0.5, 1.0], [2.0, 3.0], [4.0, 5.0]]})
path = sys.argv[1] + "/tables/t.parquet"
pq.write_table(table, path, filesystem=fs)
assert fs.get_file_info(path).size > 0
assert pq.read_table(path, filesystem=fs).equals(table)
del fs
pafs.finalize_s3()
print("round trip ok")
"""


def test_pyarrow_parquet_roundtrip(server: S3Server, bucket: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PYARROW_ROUNDTRIP, bucket],
        env={**os.environ, **server.env()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "round trip ok"
    assert server.client().head_object(Bucket=bucket, Key="tables/t.parquet")["ContentLength"] > 0


def test_wrong_secret_is_rejected(server: S3Server, bucket: str) -> None:
    from botocore.exceptions import ClientError

    bad = S3Server(
        workdir=server.workdir,
        port=server.port,
        endpoint=server.endpoint,
        access_key=server.access_key,
        secret_key="x" * len(server.secret_key),
        region=server.region,
        managed=False,
    )
    with pytest.raises(ClientError) as err:
        bad.client(retries={"max_attempts": 1}).list_objects_v2(Bucket=bucket)
    assert err.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}
    with pytest.raises(ClientError):
        bad.client(retries={"max_attempts": 1}).put_object(Bucket=bucket, Key="nope", Body=b"1")


def test_gateway_outage_and_recovery(server: S3Server, bucket: str) -> None:
    from botocore.exceptions import EndpointConnectionError

    if not server.managed:
        pytest.skip("external S3 server: no outage simulation")
    s3 = server.client()
    s3.put_object(Bucket=bucket, Key="survivor", Body=b"still here")

    server.stop_gateway()
    try:
        down = server.client(retries={"max_attempts": 1}, connect_timeout=2)
        with pytest.raises(EndpointConnectionError):
            down.get_object(Bucket=bucket, Key="survivor")
    finally:
        server.start_gateway()

    assert server.client().get_object(Bucket=bucket, Key="survivor")["Body"].read() == b"still here"


def test_too_little_free_disk_is_named_before_ceph_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free space is checked in bytes: Ceph's own check is a percentage, which on a large shared disk
    ("1 %" with 4.7 GiB free) refused to start the mon, so it is turned off."""
    if os.environ.get(EXTERNAL_ENDPOINT_VAR):
        pytest.skip("external S3 server: nothing is started")
    monkeypatch.setenv("RGW_MIN_FREE_MIB", str(2**40))
    workdir = Path(tempfile.mkdtemp(prefix="ss-full-"))
    try:
        with pytest.raises(S3ServerError, match=rf"MiB free on the filesystem of {workdir}; "):
            start_s3_server(workdir)
        assert not (workdir / "mon").exists()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
