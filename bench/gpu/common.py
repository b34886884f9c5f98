"""What the GPU checks share: the device, synchronisation, GPU utilisation sampling, JSON output."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class GpuSampler(threading.Thread):
    """Samples the GPU's utilisation (percent of time a kernel ran) every `period` seconds through NVML;
    on a machine without NVML or a GPU it records nothing."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.samples, self._stop_event = period, [], threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
        except Exception:
            self._read = None

    def run(self) -> None:
        while self._read is not None and not self._stop_event.wait(self.period):
            self.samples.append(float(self._read()))

    def __enter__(self) -> GpuSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop_event.set()
        self.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def write_result(path: str | None, result: dict[str, Any]) -> None:
    """The check's figures as JSON for `checks.py` to collect (and printed, for the log)."""
    text = json.dumps(result, indent=1, default=str)
    print(text, flush=True)
    if path:
        Path(path).write_text(text)
