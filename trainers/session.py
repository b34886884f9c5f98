"""What every Ray Train loop of slidestream does the same way: pick its device, autocast, report an
epoch with its checkpoint, restore the last one, and save / load weights.

A loop runs under Ray Train (a TorchTrainer's workers) or, for a sweep trial that trains itself, under
Ray Tune: `reporter` ("train" or "tune") says which session serves it.
"""

from __future__ import annotations

import io
import os
import tempfile
from contextlib import nullcontext
from typing import Any

import torch

from slidestream.cluster.storage import read_bytes

RESULT_FILE = "result.json"  # a job's result, written last: its presence means the job is complete
WEIGHTS_FILE = "weights.pt"
_STATE_FILE = "state.pt"


def load_weights(uri: str) -> dict[str, torch.Tensor]:
    """A state dict saved by a fold (tensors only: loaded with weights_only=True)."""
    return torch.load(io.BytesIO(read_bytes(uri)), map_location="cpu", weights_only=True)


def checkpoint_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def train_device() -> torch.device:
    """The device of this training worker: Ray Train's GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        try:
            import ray.train.torch

            return ray.train.torch.get_device()
        except (ImportError, RuntimeError):
            return torch.device("cuda")
    return torch.device("cpu")


def bf16_autocast(device: torch.device):
    """bf16 autocast on CUDA; full fp32 precision on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _session(reporter: str) -> Any:
    """The module whose `report` / `get_checkpoint` / `Checkpoint` serve this loop: Ray Train in a
    TorchTrainer, Ray Tune when a sweep trial runs the loop itself (per-epoch results feed its scheduler)."""
    if reporter == "tune":
        import ray.tune

        return ray.tune
    import ray.train

    return ray.train


def report_epoch(reporter: str, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Report an epoch; rank 0 attaches the checkpoint (a barrier: every rank calls it)."""
    session = _session(reporter)
    if state is None:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="slidestream-ckpt-") as tmp:
        torch.save(state, os.path.join(tmp, _STATE_FILE))
        session.report(metrics, checkpoint=session.Checkpoint.from_directory(tmp))


def restore_state(reporter: str) -> dict[str, Any] | None:
    checkpoint = _session(reporter).get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return torch.load(os.path.join(path, _STATE_FILE), map_location="cpu", weights_only=True)
