"""Data-parallel helpers over torch.distributed (gloo on CPU, NCCL on GPU), no-ops in a single process.

Bags differ in size and some models leave parameters unused on some bags (e.g. CLAM's instance
classifiers), so gradients are averaged explicitly after each backward instead of through DDP hooks.
"""

from __future__ import annotations

import random
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "average_gradients",
    "gather_objects",
    "gather_with_grad",
    "rank_and_world",
    "shard_with_padding",
    "sum_over_ranks",
]


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(model: nn.Module) -> None:
    """All-reduce the mean gradient of every trainable parameter (a missing gradient counts as zero)."""
    _, world = rank_and_world()
    if world == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params if p.grad is not None]  # all of them, now
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a one-element list in a single process)."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gathered gradient over ranks and keeps this rank's
    slice (torch.distributed.all_gather alone carries no gradient back to the other ranks' inputs)."""

    @staticmethod
    def forward(ctx: Any, part: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, part.shape[0]
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(part: torch.Tensor) -> torch.Tensor:
    """Every rank's `part` (same shape on all ranks) concatenated in rank order, differentiable: the
    gradient reaching this rank's `part` is the sum over ranks of the gradients of its gathered copy."""
    _, world = rank_and_world()
    if world == 1:
        return part
    return _GatherWithGrad.apply(part)


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The sum of a (detached) tensor over ranks; the value itself in a single process."""
    _, world = rank_and_world()
    if world == 1:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def shard_with_padding(items: list[str], seed: int, epoch: int, rank: int, world: int) -> list[str]:
    """This rank's part of a per-epoch shuffle of `items`, padded by repetition so all ranks take the same
    number of steps (every step is a collective); the same order on every rank for a given seed/epoch."""
    order = list(items)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    if len(order) % world:
        order += order[: world - len(order) % world]
    return order[rank::world]
