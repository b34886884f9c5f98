"""The one root of the errors a user can act on.

A `SlidestreamError` says what is wrong with what the user gave (a flag, a setting, a file, a slide
source); the command line prints it as one line and exits with its `exit_code`. Any other exception is
a bug or an outage and keeps its traceback. Subclasses that were `ValueError`s stay `ValueError`s too.
"""

from __future__ import annotations

EXIT_USAGE = 2  # the exit code of a usage error (argparse uses it too)


class SlidestreamError(Exception):
    """An error the user can fix; `exit_code` is what the command exits with."""

    exit_code: int = EXIT_USAGE


class UsageError(SlidestreamError, ValueError):
    """A command's arguments do not fit together (beyond what argparse checks)."""
