"""What a command shows: our lines and one live progress line on the console, everything in a log file.

By default (quiet) the console gets the `slidestream` loggers' lines (INFO and up, from the driver and,
routed back, from Ray's workers), other libraries' errors, the commands' own printed results, and a live
progress line (redrawn on a terminal; off a terminal, e.g. CI or `ray job submit`, a plain line at most
every `PLAIN_PROGRESS_S`). Ray's own chatter (worker output, Ray Data's executor, Ray Train's reports,
native log lines written straight to the process's stderr) goes to the log file only. `-v` gives it
back to the console, as Ray prints it.

The log file is `OUT/logs/<command>-<time>-<pid>.log` for a command with an output root (written under
the system's temp folder and placed there at the end when OUT is in object storage or does not exist yet),
else one under the system's temp folder.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from slidestream.cluster.console_routing import CONSOLE_ENV, WORKER_OUTPUT_LOGGER, untag_driver_logs
from slidestream.cluster.storage import exists, is_local, join, write_bytes_atomic

PLAIN_PROGRESS_S = 10.0
_QUIET_BELOW_ERROR = ("ray", "py.warnings")  # shown only with -v unless errors (worker output is "ray.…")
_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class LiveLine:
    """One line at the bottom of a terminal, redrawn in place; other output is written above it."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.text = ""
        self.last_plain = 0.0

    def clear(self) -> None:
        if self.tty and self.text:
            self.stream.write("\r\033[K")
            self.text = ""

    def show(self, text: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size().columns
            self.stream.write("\r\033[K" + text[: max(width - 1, 10)])
            self.text = text
        elif time.monotonic() - self.last_plain >= PLAIN_PROGRESS_S:
            self.stream.write(text + "\n")
            self.last_plain = time.monotonic()
        self.stream.flush()


class ConsoleHandler(logging.Handler):
    def __init__(self, live: LiveLine, verbose: bool) -> None:
        super().__init__(logging.DEBUG if verbose else logging.INFO)
        self.live = live
        self.verbose = verbose
        self.setFormatter(logging.Formatter("%(message)s"))

    def shows(self, record: logging.LogRecord) -> bool:
        if record.name == WORKER_OUTPUT_LOGGER:
            return False  # Ray prints it itself with -v; quiet, it is for the log file
        if self.verbose or record.levelno >= logging.ERROR:
            return True
        if _under(record.name, ("slidestream",)):
            return True
        return record.levelno >= logging.WARNING and not _under(record.name, _QUIET_BELOW_ERROR)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.shows(record):
            return
        text = self.format(record)
        if getattr(record, "progress", False):
            self.live.show(text)
            return
        self.live.clear()
        self.live.stream.write(text + "\n")
        self.live.stream.flush()


class _Tee:
    """stdout as the commands print to it: clears the live line first, and copies into the log file."""

    def __init__(self, stream: IO[str], live: LiveLine, log_file: IO[str]) -> None:
        self.stream, self.live, self.log_file = stream, live, log_file

    def write(self, text: str) -> int:
        self.live.clear()
        self.log_file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log_file.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@dataclass
class LogFile:
    """The command's log file: written at `path`; `destination` (OUT/logs/…), when set, is where it goes
    at the end, if OUT exists by then (a command refused before any work leaves no OUT behind)."""

    path: Path
    out: str | None = None
    destination: str | None = None
    ran: bool = False  # set once the command has done its work: a refused command places nothing

    @property
    def where(self) -> str:
        return self.destination or str(self.path)

    def place(self) -> None:
        if self.destination is None or self.out is None or not self.ran:
            self.destination = None
            return
        with contextlib.suppress(Exception):  # the command's result stands without its log copy
            if not exists(self.out):
                raise FileNotFoundError(self.out)
            if is_local(self.destination):
                Path(self.destination).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(self.path, self.destination)
            else:
                write_bytes_atomic(self.destination, self.path.read_bytes())
                self.path.unlink()
            return
        self.destination = None


def log_file_for(command: str, out: str | None) -> LogFile:
    """Straight into OUT/logs/ when OUT is a local folder that exists, else under the system's temp
    folder, placed into OUT/logs/ at the end."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{command}-{stamp}-{os.getpid()}.log"
    if out and is_local(out) and Path(out).is_dir():
        return LogFile(Path(out) / "logs" / name)
    local = Path(tempfile.gettempdir()) / "slidestream-logs" / name
    return LogFile(local, out, join(out, "logs", name) if out else None)


@contextlib.contextmanager
def console(command: str, out: str | None, verbose: bool) -> Iterator[LogFile]:
    """The console for one command (yields its log file). Quiet unless `verbose`."""
    logged = log_file_for(command, out)
    path = logged.path
    path.parent.mkdir(parents=True, exist_ok=True)
    previous_mode = os.environ.get(CONSOLE_ENV)
    os.environ[CONSOLE_ENV] = "verbose" if verbose else "quiet"
    untag_driver_logs()
    ray_was_up = _ray_is_up()  # called in a process that holds Ray already (tests): leave it up
    log_file = path.open("a", buffering=1)
    original_err = terminal_err = sys.stderr
    saved_fd2 = None
    if not verbose:  # native writes to fd 2 (Ray's core worker, child processes) go to the log file
        sys.stderr.flush()
        saved_fd2 = os.dup(2)
        os.dup2(log_file.fileno(), 2)
        if sys.stderr is sys.__stderr__:  # else a capture (pytest's): it does not write to fd 2
            terminal_err = os.fdopen(os.dup(saved_fd2), "w", buffering=1)
    live = LiveLine(terminal_err)
    root = logging.getLogger()
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    handlers = [file_handler, ConsoleHandler(live, verbose)]
    previous_handlers, previous_level = list(root.handlers), root.level
    for handler in previous_handlers:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)  # libraries' debug lines (fsspec's every file open) are not wanted
    logging.getLogger("slidestream").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    stdout, sys.stdout = sys.stdout, _Tee(sys.stdout, live, log_file)  # type: ignore[assignment]
    sys.stderr = terminal_err
    try:
        yield logged
    except Exception:  # a bug: its traceback goes to the console as Python prints it, and in the file
        log_file.write(traceback.format_exc())
        raise
    finally:
        if not ray_was_up and _ray_is_up():  # its shutdown lines belong in the log too
            sys.modules["ray"].shutdown()
        live.clear()
        sys.stdout = stdout
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        for handler in previous_handlers:
            root.addHandler(handler)
        root.setLevel(previous_level)
        logging.captureWarnings(False)
        if saved_fd2 is not None:
            sys.stderr.flush()
            os.dup2(saved_fd2, 2)
            os.close(saved_fd2)
        if terminal_err is not original_err:
            terminal_err.close()
        sys.stderr = original_err
        log_file.close()
        if previous_mode is None:
            os.environ.pop(CONSOLE_ENV, None)
        else:
            os.environ[CONSOLE_ENV] = previous_mode
        logged.place()


def _ray_is_up() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()
