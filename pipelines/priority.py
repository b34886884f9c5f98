"""Run a pipeline's CPU work (read, decode, resize, encode shards) at idle priority.

When the encoder shares a machine with the tasks that feed it, the OS would otherwise preempt the
encoder's threads for a read task, and its other threads then wait at the next barrier for the one that
was preempted. At idle priority (Linux `SCHED_IDLE`) the reading runs only on cores the encoder leaves
free, which is what "hiding I/O and decoding behind compute" means. Where the encoder is on another
machine, or there is no encoder, nothing else competes and the work runs as fast as before.

The priority is set on a thread made for the call, never on the Ray worker's own thread: an unprivileged
process cannot take a priority back, and Ray reuses its workers for other tasks.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def _lower_this_thread() -> None:
    # 0: the calling thread (Linux). A kernel or container that refuses: run at normal priority.
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def at_idle_priority(fn: Callable[P, T]) -> Callable[P, T]:
    """`fn`, called in a thread of idle scheduling priority (where the OS has one, else as is)."""
    if not hasattr(os, "SCHED_IDLE"):
        return fn

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        with ThreadPoolExecutor(1, "idle-priority", initializer=_lower_this_thread) as pool:
            return pool.submit(fn, *args, **kwargs).result()

    return run
