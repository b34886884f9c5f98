"""Why a slide cannot be processed, and whether trying again later can help."""

from __future__ import annotations

from slidestream.cluster.storage import scrub_secrets


class SlideError(Exception):
    """A slide that cannot be processed. `permanent` errors are not retried until the file changes."""

    def __init__(self, reason: str, permanent: bool = True) -> None:
        super().__init__(reason)
        self.reason = scrub_secrets(reason)
        self.permanent = permanent


def classify(what: str, exc: BaseException) -> SlideError:
    """Storage/network errors are transient (retried on the next run); anything else is permanent."""
    if isinstance(exc, SlideError):
        return exc
    transient = isinstance(exc, OSError | ConnectionError | TimeoutError)
    return SlideError(f"{what}: {type(exc).__name__}: {exc}", permanent=not transient)
