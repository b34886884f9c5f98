"""NT-Xent (SimCLR's normalised-temperature cross entropy) over a GLOBAL batch split across workers.

With W ranks each holding b of the B slides (two views each), every rank gathers all 2B projections with
a gather that carries gradients back (`trainers.dist.gather_with_grad`), scores its own 2b anchor rows
against all 2B views, and the per-rank parts add up to the loss of the full batch. `global_ntxent`
returns that full-batch loss on every rank, and its backward gives each rank exactly the full-batch
gradient of its own rows; parameter gradients are then the SUM over ranks (`backward_global`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidestream.trainers.dist import average_gradients, gather_with_grad, rank_and_world, sum_over_ranks

__all__ = ["backward_global", "global_ntxent", "ntxent", "ntxent_rows"]


def ntxent_rows(anchors: torch.Tensor, views: torch.Tensor, anchor_index: torch.Tensor, tau: float):
    """Summed NT-Xent terms of some anchor rows of the 2B views [z1; z2] (L2-normalised inside).

    `anchors` are the rows `anchor_index` of `views`; the positive of row i is row (i + B) mod 2B and
    every other row except i itself is a negative.
    """
    n = views.shape[0]
    half = n // 2
    a = F.normalize(anchors, dim=1)
    v = F.normalize(views, dim=1)
    logits = a @ v.t() / tau
    logits = logits.masked_fill(F.one_hot(anchor_index, n).bool(), float("-inf"))
    positives = (anchor_index + half) % n
    return F.cross_entropy(logits, positives, reduction="sum")


def ntxent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """Mean NT-Xent over the 2B views of one process's batch (z1[i] and z2[i] are the two views of i)."""
    views = torch.cat([z1, z2])
    index = torch.arange(views.shape[0], device=views.device)
    return ntxent_rows(views, views, index, tau) / views.shape[0]


def global_ntxent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """The NT-Xent of the global batch, from this rank's part (every rank holds the same number of rows).

    Value: the full-batch loss (identical on every rank). Gradient: the full-batch loss's gradient with
    respect to this rank's rows. In a single process this is `ntxent`.
    """
    rank, world = rank_and_world()
    if world == 1:
        return ntxent(z1, z2, tau)
    b = z1.shape[0]
    all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
    total = all1.shape[0]
    views = torch.cat([all1, all2])
    mine = torch.arange(rank * b, (rank + 1) * b, device=z1.device)
    index = torch.cat([mine, mine + total])
    part = ntxent_rows(torch.cat([z1, z2]), views, index, tau) / (2 * total)
    full = sum_over_ranks(part.detach())
    return part + (full - part.detach())


def backward_global(loss: torch.Tensor, model: nn.Module) -> None:
    """Backpropagate a `global_ntxent` loss and leave every rank with the full-batch parameter gradients
    (each rank's gradient is its rows' share, so the ranks' gradients are summed)."""
    _, world = rank_and_world()
    (loss * world).backward()
    average_gradients(model)  # mean of world × share = sum of the shares
