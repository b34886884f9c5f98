"""Where output goes when a command runs with the slidestream console (`slidestream …`, not the library).

Ray forwards every worker's stdout/stderr to the driver (`log_to_driver`), where it is printed as it
comes: our epoch lines between Ray Train's "Reporting training result …", Ray Data's operator logs and
Ray's own warnings. With the console on, the split is made at the source instead of by matching text:

- in every worker, the `slidestream` loggers write their records in a tagged form (`tag_worker_logs`);
- on the driver, Ray's worker-output stream is routed (`route_worker_output`): a tagged line becomes a
  log record of the same logger and level again (so it reaches the console as if logged on the driver),
  every other line is Ray's or a library's and goes to the log file — and, with `-v`, to the console as
  Ray prints it;
- Ray's own Python loggers on the driver lose their console handlers and propagate to the root logger,
  whose handlers (set up by the command line) decide what the console shows.

The mode travels to workers in the environment (`CONSOLE_ENV`), so a local instance's workers and a
cluster's (through the driver's runtime env) tag their records alike.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

CONSOLE_ENV = "SLIDESTREAM_CONSOLE"  # "quiet" or "verbose"; unset: Ray's defaults, nothing routed
# A log record passed from a worker to the driver: level, logger name, progress flag, message.
_TAG = re.compile(r"^\[slidestream (\w+) ([\w.]+) ([01])\] (.*)$")
# Loggers of Ray that print on the driver's console by default.
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
WORKER_OUTPUT_LOGGER = "ray.worker_output"


def console_mode() -> str | None:
    return os.environ.get(CONSOLE_ENV) or None


class _TaggedFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        progress = int(bool(getattr(record, "progress", False)))
        lines = super().format(record).splitlines() or [""]
        # One tagged line per line of the message, so a traceback comes back whole and in order.
        tag = f"[slidestream {record.levelname} {record.name} {progress}]"
        return "\n".join(f"{tag} {line}" for line in lines)


def tag_worker_logs() -> None:
    """In a Ray worker: the `slidestream` loggers write tagged lines to stderr (INFO and up: a worker's
    root logger would drop INFO). Idempotent; a no-op without the console mode."""
    if not console_mode():
        return
    logger = logging.getLogger("slidestream")
    if any(isinstance(h.formatter, _TaggedFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TaggedFormatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def untag_driver_logs() -> None:
    """On the driver: the `slidestream` loggers go through the root logger's handlers (undoes
    `tag_worker_logs`, which runs on import in every process that has the console variable)."""
    logger = logging.getLogger("slidestream")
    for handler in [h for h in logger.handlers if isinstance(h.formatter, _TaggedFormatter)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


def parse_tagged(line: str) -> tuple[int, str, bool, str] | None:
    """(level, logger name, progress, message) of a tagged worker line; None for any other line."""
    match = _TAG.match(line)
    if match is None:
        return None
    level, name, progress, message = match.groups()
    return logging.getLevelNamesMapping().get(level, logging.INFO), name, progress == "1", message


def adopt_ray_loggers() -> None:
    """Ray's driver-side loggers (Ray Data's executor lines, the token-auth notice, …) propagate to the
    root logger instead of printing through their own console handlers. Ray Data sets its handlers up
    when imported, Ray Core on `ray.init`: call it before and after. A no-op without the console."""
    if not console_mode():
        return
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                logger.removeHandler(handler)
        logger.propagate = True


def _route(data: dict[str, Any], ray_print: Callable[[dict[str, Any]], None], verbose: bool) -> None:
    """One batch of worker output: tagged lines become log records again, the rest is Ray's."""
    others = []
    for line in data.get("lines", []):
        parsed = parse_tagged(line)
        if parsed is None:
            others.append(line)
            continue
        level, name, progress, message = parsed
        logging.getLogger(name).log(level, message, extra={"progress": progress})
    if not others:
        return
    if verbose:
        ray_print({**data, "lines": others})
    where = data.get("actor_name") or data.get("task_name") or "worker"
    log = logging.getLogger(WORKER_OUTPUT_LOGGER)
    for line in others:
        log.info("(%s pid=%s) %s", where, data.get("pid"), line)


def _log_ray_notice(data: dict[str, Any], ignore_prefix: bool = False) -> None:
    """Ray's error channel (raylet notices such as "N worker processes have been started"), quiet:
    a warning of the `ray` logger tree, so in the log file. What fails a task also fails our call."""
    log = logging.getLogger("ray.notices")
    for line in data.get("lines", []):
        log.warning("(%s) %s", data.get("pid"), line)


def route_worker_output() -> None:
    """Replace Ray's printing of worker output on this driver by `_route` (after `ray.init`); quiet,
    Ray's error channel too, which Ray prints through the module's `print_to_stdstream`."""
    mode = console_mode()
    if not mode:
        return
    from ray._private import worker as ray_worker  # the dispatcher Ray's own log printing registers with

    if mode == "quiet":
        ray_worker.print_to_stdstream = _log_ray_notice

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    ray_print = dict(dispatcher.handlers).get("ray_print_logs")
    if ray_print is None or getattr(ray_print, "slidestream_route", False):
        return  # log_to_driver is off, or routed already
    route = functools.partial(_route, ray_print=ray_print, verbose=mode == "verbose")
    route.slidestream_route = True  # type: ignore[attr-defined]
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", route)
