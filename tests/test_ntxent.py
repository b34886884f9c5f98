"""NT-Xent: the official golden values, and the global batch over 2 gloo processes (projections gathered
with autograd) gives the same loss and the same gradients as one process holding the full batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from slidestream.trainers.gigassl.ntxent import backward_global, global_ntxent, ntxent

B, DIM, WORLD = 8, 256, 2


def _golden_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    z1 = torch.randn(8, 256, dtype=torch.float64)
    z2 = torch.randn(8, 256, dtype=torch.float64)
    return z1, z2


@pytest.mark.parametrize("tau, expected", [(0.05, 2.9713403649), (0.1, 2.6819551753), (0.5, 2.6765901381)])
def test_golden_values(tau, expected):
    z1, z2 = _golden_inputs()
    assert ntxent(z1, z2, tau).item() == pytest.approx(expected, abs=1e-9)


def test_positives_pull_the_loss_down():
    z1, _ = _golden_inputs()
    aligned = ntxent(z1, z1 + 0.01 * torch.randn_like(z1), 0.05)
    assert aligned.item() < 0.1 < ntxent(z1, torch.randn_like(z1), 0.05).item()


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """Inputs of the full batch and a shared head (the same on every rank: same seed)."""
    z1, z2 = _golden_inputs()
    torch.manual_seed(1)
    head = torch.nn.Linear(DIM, 64).double()
    return z1, z2, head


def _full_batch() -> dict[str, torch.Tensor]:
    z1, z2, head = _problem()
    x1, x2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    loss = ntxent(head(x1), head(x2), 0.05)
    loss.backward()
    return {"loss": loss.detach(), "g1": x1.grad, "g2": x2.grad, "w": head.weight.grad, "b": head.bias.grad}


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        z1, z2, head = _problem()
        part = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        x1, x2 = z1[part].clone().requires_grad_(True), z2[part].clone().requires_grad_(True)
        loss = global_ntxent(head(x1), head(x2), 0.05)
        # this rank's rows get exactly their full-batch gradient …
        g1, g2 = torch.autograd.grad(loss, [x1, x2], retain_graph=True)
        # … and the parameters, shared by all rows, the full-batch gradient after the reduction
        backward_global(loss, head)
        result = {"loss": loss.detach(), "g1": g1, "g2": g2, "w": head.weight.grad, "b": head.bias.grad}
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_the_full_batch(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    full = _full_batch()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank, got in enumerate(ranks):
        part = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        assert got["loss"].item() == pytest.approx(full["loss"].item(), abs=1e-12)
        assert torch.allclose(got["g1"], full["g1"][part], atol=1e-12)
        assert torch.allclose(got["g2"], full["g2"][part], atol=1e-12)
        assert torch.allclose(got["w"], full["w"], atol=1e-12)
        assert torch.allclose(got["b"], full["b"], atol=1e-12)
    # a gather without gradients to the other ranks would lose most of the gradient: it is not small
    assert full["g1"].abs().max() > 1e-3
