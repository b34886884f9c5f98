"""A real S3 server for the test suite: Ceph RADOS Gateway on 127.0.0.1.

``start_s3_server()`` installs the Debian ceph packages when ``radosgw`` is missing (needs root or
passwordless sudo, and apt access), then starts a single-node cluster (one mon, one memstore OSD, one
radosgw) under ``workdir`` through ``slidestream/testing/rgw.sh`` and returns an :class:`S3Server` with the
endpoint and the keys of an S3 user. Starting is idempotent: a healthy server already running in that
workdir is reused as it is.

Using an existing server instead: set ``SLIDESTREAM_S3_ENDPOINT`` (e.g. ``http://127.0.0.1:7480``)
together with ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (and optionally
``AWS_DEFAULT_REGION``). ``start_s3_server`` then starts nothing and returns that server;
``stop_s3_server`` leaves it alone, and the outage simulation (``stop_gateway``/``start_gateway``) is
not available (``S3Server.managed`` is False).

Secrets are never printed or logged: ``repr(server)`` omits the secret key, and errors from the shell
script carry only its stderr (which never contains secrets), never the environment.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

RGW_SH = Path(__file__).resolve().with_name("rgw.sh")
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "slidestream-rgw"
EXTERNAL_ENDPOINT_VAR = "SLIDESTREAM_S3_ENDPOINT"
REGION = "us-east-1"

# Environment names that must never reach a subprocess' error message or our logs.
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class S3ServerError(RuntimeError):
    """The S3 test server could not be installed, started or stopped."""


@dataclass
class S3Server:
    """Connection details of a running S3 server (``workdir`` is None for an external server)."""

    workdir: Path | None
    port: int
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = REGION
    managed: bool = True  # False: an external server given through SLIDESTREAM_S3_ENDPOINT

    def env(self) -> dict[str, str]:
        """Environment for boto3 / s3fs / pyarrow / Ray workers talking to this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # pyarrow >= 26 / recent botocore send CRC checksums by default; radosgw (pacific) rejects
            # some of those requests, so only send them when the operation requires it.
            "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "WHEN_REQUIRED",
        }

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs ``storage_options`` for this server."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": self.region},
            "config_kwargs": {
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            },
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server; ``config`` goes to ``botocore.config.Config``."""
        import boto3
        from botocore.config import Config

        cfg = {
            "connect_timeout": 5,
            "read_timeout": 60,
            "retries": {"max_attempts": 3, "mode": "standard"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
            "s3": {"addressing_style": "path"},
        }
        cfg.update(config)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**cfg),
        )

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name`` (S3 rules: 3-63 chars, lowercase); no error if we already own it."""
        from botocore.exceptions import ClientError

        try:
            self.client().create_bucket(Bucket=name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise

    def stop_gateway(self) -> None:
        """Stop only radosgw (mon/osd and the data stay): S3 requests fail until start_gateway()."""
        _run("stop-gateway", str(self._managed_workdir()), timeout=60)

    def start_gateway(self) -> None:
        """Start radosgw again on the same port; the data written before the outage is still there."""
        _run("start-gateway", str(self._managed_workdir()), str(self.port), timeout=180)

    def _managed_workdir(self) -> Path:
        if not self.managed or self.workdir is None:
            raise S3ServerError(
                f"the S3 server at {self.endpoint} is external ({EXTERNAL_ENDPOINT_VAR}); "
                "it cannot be stopped or started from the tests"
            )
        return self.workdir


def _script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SECRET_VARS}
    env.setdefault("DEBIAN_FRONTEND", "noninteractive")
    return env


def _run(*args: str, timeout: float, secret_output: bool = False) -> str:
    """Run ``rgw.sh ARGS``; return stdout. Errors carry stderr only (and never stdout if secret)."""
    cmd = ["bash", str(RGW_SH), *args]
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_script_env(),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise S3ServerError(f"rgw.sh {' '.join(args)} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip()[-6000:]
        if not secret_output and proc.stdout.strip():
            detail = proc.stdout.strip()[-2000:] + "\n" + detail
        raise S3ServerError(f"rgw.sh {' '.join(args)} failed (exit {proc.returncode}):\n{detail}")
    return proc.stdout


def _parse_exports(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            out[key] = value
    return out


def _external_server() -> S3Server | None:
    endpoint = os.environ.get(EXTERNAL_ENDPOINT_VAR, "").strip()
    if not endpoint:
        return None
    access = os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    if not access or not secret:
        raise S3ServerError(
            f"{EXTERNAL_ENDPOINT_VAR} is set but AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY are not"
        )
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise S3ServerError(f"{EXTERNAL_ENDPOINT_VAR} must be an http(s) URL, got {endpoint!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return S3Server(
        workdir=None,
        port=port,
        endpoint=endpoint.rstrip("/"),
        access_key=access,
        secret_key=secret,
        region=os.environ.get("AWS_DEFAULT_REGION") or REGION,
        managed=False,
    )


def start_s3_server(workdir: Path | None = None, port: int = 0) -> S3Server:
    """Install (if needed) and start the S3 server in ``workdir``; ``port`` 0 picks a free port.

    Returns the external server instead when ``SLIDESTREAM_S3_ENDPOINT`` is set (see module doc).
    """
    external = _external_server()
    if external is not None:
        return external
    workdir = Path(workdir) if workdir is not None else DEFAULT_WORKDIR
    workdir.mkdir(parents=True, exist_ok=True)
    _run("install", timeout=1200)
    _run("start", str(workdir), str(int(port)), timeout=300)
    env = _parse_exports(_run("env", str(workdir), timeout=30, secret_output=True))
    try:
        endpoint = env["AWS_ENDPOINT_URL"]
        access, secret = env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    except KeyError as exc:
        raise S3ServerError(f"rgw.sh env printed no {exc.args[0]}") from None
    return S3Server(
        workdir=workdir,
        port=urlparse(endpoint).port or 80,
        endpoint=endpoint,
        access_key=access,
        secret_key=secret,
        region=env.get("AWS_DEFAULT_REGION", REGION),
    )


def stop_s3_server(server: S3Server) -> None:
    """Stop every daemon of a server started by start_s3_server (external servers are left alone)."""
    if server.managed and server.workdir is not None:
        _run("stop", str(server.workdir), timeout=120)
