"""What every Ray Train loop of slidestream does the same way: pick its device, autocast, report an
epoch with its checkpoint, restore the last one, and save / load weights.

A loop runs under Ray Train (a TorchTrainer's workers), in the calling process (`workers: 0`, inside
`in_process_checkpoints`: its checkpoint is kept in storage by us, so it resumes as under Ray Train), or,
for a sweep trial that trains itself, under Ray Tune: `reporter` ("train" or "tune") says which session
serves it.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

import torch

from slidestream.cluster.storage import exists, join, read_bytes, write_bytes_atomic

RESULT_FILE = "result.json"  # a job's result, written last: its presence means the job is complete
WEIGHTS_FILE = "weights.pt"
_STATE_FILE = "state.pt"
# Where a loop running in this process keeps its checkpoint (None: Ray Train's session keeps it).
_IN_PROCESS_CHECKPOINT: ContextVar[str | None] = ContextVar("in_process_checkpoint", default=None)


@contextmanager
def in_process_checkpoints(uri: str) -> Iterator[None]:
    """Loops called in this context keep their last checkpoint at `uri` (local or s3://)."""
    token = _IN_PROCESS_CHECKPOINT.set(join(uri, _STATE_FILE))
    try:
        yield
    finally:
        _IN_PROCESS_CHECKPOINT.reset(token)


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
    stored = _IN_PROCESS_CHECKPOINT.get()
    if reporter == "train" and stored is not None:
        if state is not None:
            write_bytes_atomic(stored, checkpoint_bytes(state))
        return
    session = _session(reporter)
    if state is None:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="slidestream-ckpt-") as tmp:
        torch.save(state, os.path.join(tmp, _STATE_FILE))
        session.report(metrics, checkpoint=session.Checkpoint.from_directory(tmp))


def restore_state(reporter: str) -> dict[str, Any] | None:
    stored = _IN_PROCESS_CHECKPOINT.get()
    if reporter == "train" and stored is not None:
        return load_weights(stored) if exists(stored) else None
    checkpoint = _session(reporter).get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as path:
        return torch.load(os.path.join(path, _STATE_FILE), map_location="cpu", weights_only=True)
