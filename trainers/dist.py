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

__all__ = ["average_gradients", "gather_objects", "rank_and_world", "shard_with_padding"]


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
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a one-element list in a single process)."""
    _, world = rank_and_world()
    if world == 1:
        return [value]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, value)
    return out


def shard_with_padding(items: list[str], seed: int, epoch: int, rank: int, world: int) -> list[str]:
    """This rank's part of a per-epoch shuffle of `items`, padded by repetition so all ranks take the same
    number of steps (every step is a collective); the same order on every rank for a given seed/epoch."""
    order = list(items)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    if len(order) % world:
        order += order[: world - len(order) % world]
    return order[rank::world]
