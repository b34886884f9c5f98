"""Object-storage errors a user can act on, said in one line before any work starts.

`check_storage(uri)` is the pre-flight check the command line runs on every `s3://` argument before the
command itself (so before Ray starts): one cheap listing of the URI's prefix. `storage_access(uri)`
turns what botocore, aiobotocore, aiohttp or s3fs raise for it into a `StorageAccessError` (exit 2)
whose one line names the URI and what to check: missing or invalid credentials, access denied, a
missing bucket, an endpoint that cannot be reached. Anything it does not recognise is raised unchanged
(an internal error keeps its traceback). A missing prefix is left to the commands, which already say
"slide source not found: URI" and the like.

The check gives up quickly: at most `PREFLIGHT_ATTEMPTS` attempts (fewer when `AWS_MAX_ATTEMPTS` says
so), `PREFLIGHT_CONNECT_TIMEOUT_S` to connect, `PREFLIGHT_READ_TIMEOUT_S` for an answer. Requests made
after it, by the work itself, keep the patient retry policy of `slidestream.cluster.storage`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from fsspec.core import url_to_fs

from slidestream.cluster.errors import EXIT_USAGE, SlidestreamError
from slidestream.cluster.storage import protocol_of, scrub_secrets, storage_options

PREFLIGHT_ATTEMPTS = 3
PREFLIGHT_CONNECT_TIMEOUT_S = 5
PREFLIGHT_READ_TIMEOUT_S = 15

CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
_INVALID_CREDENTIALS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
)
_EXPIRED_CREDENTIALS = ("ExpiredToken", "TokenRefreshRequired", "RequestExpired")
_ACCESS_DENIED = ("AccessDenied", "AllAccessDisabled", "AccountProblem", "403")
_NO_BUCKET = ("NoSuchBucket",)


class StorageAccessError(SlidestreamError):
    """Object storage refused or could not be reached for a URI the user gave; the message says what to
    check. Exit code 2, like the other errors in what the user gave."""

    exit_code = EXIT_USAGE


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from (s3fs keeps botocore's error as the cause)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _endpoint(found: BaseException | None = None) -> str:
    """The endpoint the requests went to: AWS_ENDPOINT_URL, else the scheme and host of the failed
    request's URL (botocore's connection errors carry it), else AWS itself."""
    configured = os.environ.get("AWS_ENDPOINT_URL")
    if configured:
        return configured
    url = (getattr(found, "kwargs", None) or {}).get("endpoint_url")
    if url:
        parsed = urlsplit(str(url))
        return f"{parsed.scheme}://{parsed.netloc}" if parsed.netloc else str(url)
    return "the AWS S3 endpoint"


def _bucket(uri: str) -> str:
    return uri.split("://", 1)[-1].split("/", 1)[0]


def _client_error_code(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code")
        if code:
            return str(code)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status) if status else None
    return None


def _unreachable(exc: BaseException) -> bool:
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionRefusedError):
        return True
    try:
        from aiohttp import ClientConnectorError
    except ImportError:  # pragma: no cover - aiohttp comes with s3fs
        return False
    return isinstance(exc, ClientConnectorError)


def _what_to_check(uri: str, exc: BaseException, action: str) -> str | None:
    """What is wrong and what to check, or None when no exception of the chain is a storage error we know."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError, ProfileNotFound

    bucket = _bucket(uri)
    for found in _chain(exc):
        if isinstance(found, NoCredentialsError):
            return f"no S3 credentials found: set {CREDENTIAL_VARS}"
        if isinstance(found, PartialCredentialsError):
            missing = found.kwargs.get("cred_var", "?")
            return f"incomplete S3 credentials ({missing} missing): set {CREDENTIAL_VARS}"
        if isinstance(found, ProfileNotFound):
            profile = found.kwargs.get("profile", "?")
            return f"AWS_PROFILE names profile {profile!r}, which the AWS config files do not have"
        if _unreachable(found):
            return f"no answer from {_endpoint(found)}: is it running and reachable? (check AWS_ENDPOINT_URL)"
        code = _client_error_code(found)
        if code in _INVALID_CREDENTIALS:
            return (
                f"the credentials are not valid for {_endpoint()} ({code}): check {CREDENTIAL_VARS} "
                "and AWS_ENDPOINT_URL"
            )
        if code in _EXPIRED_CREDENTIALS:
            return f"the credentials have expired ({code}): renew them ({CREDENTIAL_VARS}, AWS_SESSION_TOKEN)"
        if code == "RequestTimeTooSkewed":
            return (
                "this machine's clock is too far off the server's (RequestTimeTooSkewed): set the clock right"
            )
        if code in _ACCESS_DENIED:
            return f"access denied: the credentials lack permission to {action} bucket {bucket!r}"
        if code in _NO_BUCKET:
            return f"bucket {bucket!r} does not exist at {_endpoint()}: check the name, or create it"
    return None


@contextmanager
def storage_access(uri: str, action: str = "read") -> Iterator[None]:
    """Storage errors of the block, for `uri`, as one-line `StorageAccessError`s; anything else unchanged."""
    try:
        yield
    except SlidestreamError:
        raise
    except Exception as exc:
        what = _what_to_check(uri, exc, action)
        if what is None:
            raise
        raise StorageAccessError(scrub_secrets(f"cannot access {uri}: {what}")) from exc


def is_object_storage(uri: str) -> bool:
    return protocol_of(uri) in ("s3", "s3a")


def _preflight_options(uri: str) -> dict[str, Any]:
    """The usual options for `uri`, but quick to give up: few attempts, short timeouts, no s3fs retries."""
    options = storage_options(uri)
    configured = options["config_kwargs"]["retries"]["max_attempts"]
    options["config_kwargs"] = {
        "retries": {"max_attempts": min(configured, PREFLIGHT_ATTEMPTS), "mode": "standard"},
        "connect_timeout": PREFLIGHT_CONNECT_TIMEOUT_S,
        "read_timeout": PREFLIGHT_READ_TIMEOUT_S,
    }
    options["skip_instance_cache"] = True
    return options


def check_storage(uri: str) -> None:
    """Pre-flight check of an object-storage URI: can these credentials list its prefix at this endpoint?

    One `ListObjectsV2` (at most one key) of the URI's prefix, so a URI that does not exist yet (an output
    root) passes as long as its bucket is there. When listing is denied, reading the object itself (a
    labels file, a slide list) still passes. Local paths and other protocols are not checked.
    """
    if not is_object_storage(uri):
        return
    with storage_access(uri, "list"):
        fs, path = url_to_fs(uri, **_preflight_options(uri))
        fs.retries = 1  # s3fs' own retries, on top of botocore's
        bucket, _, key = path.partition("/")
        try:
            fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
        except PermissionError:
            if not (key and _readable(fs, bucket, key)):
                raise


def _readable(fs: Any, bucket: str, key: str) -> bool:
    """Whether the object itself can be read where its bucket cannot be listed (a read-only grant)."""
    try:
        fs.call_s3("head_object", Bucket=bucket, Key=key)
    except Exception:
        return False
    return True
