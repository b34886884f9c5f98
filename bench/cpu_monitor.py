"""CPU seconds used per group of processes while a block of code runs (psutil, sampled every second).

Ray starts and ends worker processes during a run; sampling keeps the last CPU time seen of a process
that ends before the block does (at most one interval of its CPU is missed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import psutil

# (group name, does the process with this pid and command line belong to it?); the first match wins
Rule = tuple[str, Callable[[int, str], bool]]
OTHER = "other processes on the machine"


class CpuMonitor:
    def __init__(self, rules: list[Rule], interval_s: float = 1.0) -> None:
        self.rules, self.interval_s = rules, interval_s
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def __enter__(self) -> CpuMonitor:
        self._start = {pid: cpu for pid, (_, cpu) in _snapshot().items()}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(_snapshot())

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._last.update(_snapshot())

    def by_group(self) -> dict[str, float]:
        """CPU seconds used during the block, per rule's group (every group listed, in rule order)."""
        used = {name: 0.0 for name, _ in self.rules} | {OTHER: 0.0}
        for pid, (cmdline, cpu) in self._last.items():
            group = next((name for name, belongs in self.rules if belongs(pid, cmdline)), OTHER)
            used[group] += max(0.0, cpu - self._start.get(pid, 0.0))
        return used


def _snapshot() -> dict[int, tuple[str, float]]:
    """pid → (command line, CPU seconds so far) of every process that can be read."""
    seen = {}
    for proc in psutil.process_iter(["cmdline", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        cmdline = " ".join(proc.info["cmdline"] or [])
        seen[proc.pid] = (cmdline or f"pid {proc.pid}", times.user + times.system)
    return seen
