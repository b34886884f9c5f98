"""fsspec helpers: one way to reach local paths and object storage (s3://) everywhere in the project.

Credentials are never passed around in code or config: s3fs/botocore read them from the environment or
the standard AWS config files. Only the (non-secret) endpoint is forwarded explicitly, because some
clients ignore `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from slidestream.cluster.errors import SlidestreamError

SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Variables that workers need to reach object storage; forwarded through the Ray runtime env.
STORAGE_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
    *SECRET_ENV_VARS,
)
# botocore's retry policy unless the standard AWS_MAX_ATTEMPTS / AWS_RETRY_MODE variables say otherwise:
# patient by default (a storage hiccup must not fail a slide), quick to give up where that is wanted.
DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_RETRY_MODE = "adaptive"


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) in ("file", "local")


def storage_options(uri: str) -> dict[str, Any]:
    """Non-secret fsspec options for `uri` (endpoint override for S3-compatible servers)."""
    if protocol_of(uri) in ("s3", "s3a"):
        options: dict[str, Any] = {
            "config_kwargs": {"retries": _retry_policy()},
            # Listings must be fresh: ledgers and shard directories change under other processes.
            "use_listings_cache": False,
        }
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["client_kwargs"] = {"endpoint_url": endpoint}
        return options
    return {}


class StorageSettingError(SlidestreamError, ValueError):
    """A storage variable of the environment (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE) has no usable value."""


def _retry_policy() -> dict[str, Any]:
    attempts = os.environ.get("AWS_MAX_ATTEMPTS", str(DEFAULT_MAX_ATTEMPTS))
    if not attempts.isdigit() or int(attempts) < 1:
        raise StorageSettingError(f"AWS_MAX_ATTEMPTS must be a whole number ≥ 1, got {attempts!r}")
    mode = os.environ.get("AWS_RETRY_MODE", DEFAULT_RETRY_MODE)
    if mode not in ("legacy", "standard", "adaptive"):
        raise StorageSettingError(f"AWS_RETRY_MODE must be legacy, standard or adaptive, got {mode!r}")
    return {"max_attempts": int(attempts), "mode": mode}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for `uri` and the path inside it."""
    if is_local(uri):
        uri = os.path.abspath(uri.removeprefix("file://"))
    return url_to_fs(uri, **storage_options(uri))


def join(uri: str, *parts: str) -> str:
    if is_local(uri):
        return os.path.join(uri, *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URI a path inside `fs` is known by (`s3://bucket/key` or an absolute local path)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Whole-object write that a reader sees either complete or not at all.

    Local files go through a temporary name and `os.replace`; an S3 PUT is atomic by itself.
    """
    fs, path = filesystem(uri)
    if is_local(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def scrub_secrets(text: str) -> str:
    """Remove the values of secret environment variables from a message before it is shown or stored."""
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{name}>")
    return text
