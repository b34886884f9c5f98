"""The contract every MIL aggregator model follows, so trainers, MHIM and heatmaps treat them alike.

A model takes one bag ``x`` of shape (N, D) or (1, N, D) and returns a dict with at least
``logits`` (1, C), ``bag_feature`` (R, F) — R = 1 except for DSMIL (one row per class); MHIM's consistency
loss compares it row by row and averages — and ``scores`` — per-instance scores used for hard-instance
mining and heatmaps, shape (N,) or (H, N) for multi-head models. Models with extra training terms put what
they need into the same dict and fold it into ``loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slidestream.trainers.models.layers import InstanceEmbedding

__all__ = ["MILModel", "as_bag"]


def as_bag(x: Tensor, model: str) -> Tensor:
    """One bag as an (N, D) tensor from (N, D) or (1, N, D); a clear error for anything else."""
    if x.dim() == 3:
        if x.shape[0] != 1:
            raise ValueError(f"{model} takes one bag at a time, got a batch of {x.shape[0]}")
        x = x[0]
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{model} expects one bag, (N, D) or (1, N, D) with N ≥ 1, got {tuple(x.shape)}")
    return x


class MILModel(nn.Module):
    """Base class: an instance embedding ``embed`` (its first Linear seeds MHIM students), a classifier."""

    embed: InstanceEmbedding
    n_classes: int

    def loss(self, out: dict[str, Tensor], target: Tensor) -> Tensor:
        """The model's training loss for one bag; ``target`` is a (1,) long tensor. Default: bag CE."""
        return nn.functional.cross_entropy(out["logits"], target)

    def probabilities(self, out: dict[str, Tensor]) -> Tensor:
        """Class probabilities (1, C) from a forward output. Default: softmax of the bag logits."""
        return torch.softmax(out["logits"], dim=-1)

    @staticmethod
    def heatmap_scores(out: dict[str, Tensor]) -> Tensor:
        """One score per instance (N,) for heatmaps: multi-head scores are averaged over heads."""
        scores = out["scores"].detach().float()
        return scores if scores.dim() == 1 else scores.mean(dim=0)
