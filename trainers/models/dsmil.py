"""DSMIL aggregator: a max-pooling instance classifier and a critical-instance attention bag classifier.

Written for this project from the DSMIL paper (Li et al., CVPR 2021). The bag feature that MHIM's
consistency loss compares is the bag representation ``B`` itself, C rows of 512: the loss is taken per
class row and averaged over the rows, as the official MHIM-MIL code does with DSMIL.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slidestream.trainers.models.base import MILModel, as_bag
from slidestream.trainers.models.layers import InstanceEmbedding, init_weights

__all__ = ["DSMIL"]


class DSMIL(MILModel):
    """DSMIL aggregator on 512-d instance embeddings ``h``.

    - Instance stream: ``c = Linear(512→C)(h)`` (N, C); its max over instances is a max-pooling MIL
      prediction.
    - Bag stream: per class, the critical instance is the argmax of ``c``; attention
      ``A = softmax_N(q(h) · q(h_crit)ᵀ / √128)`` (N, C) with ``q = Linear(512,128) → ReLU →
      Linear(128,128) → Tanh``; the bag representation is ``B = Aᵀ v(h)`` (C, 512) with
      ``v = Dropout(v_dropout) → Linear(512,512) → ReLU``; ``Conv1d(C, C, 512)`` over ``B`` gives the bag
      logits (1, C).

    Output dict: ``logits`` (bag logits), ``instance_logits`` (N, C), ``attention`` (N, C), ``bag_feature``
    (C, 512) = ``B`` (one row per class), ``scores`` (N,) = max over classes of the instance logits.
    """

    def __init__(
        self, in_dim: int, n_classes: int = 2, dropout: float = 0.25, *, v_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.embed = InstanceEmbedding(in_dim, 512, dropout)
        self.n_classes = n_classes
        self.instance_classifier = nn.Linear(512, n_classes)
        self.q = nn.Sequential(nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh())
        self.v = nn.Sequential(nn.Dropout(v_dropout), nn.Linear(512, 512), nn.ReLU())
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=512)
        init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run one bag ``x`` of shape (N, D) or (1, N, D); see the class docstring for the outputs."""
        h = self.embed(as_bag(x, "DSMIL"))
        instance_logits = self.instance_classifier(h)  # (N, C)
        critical = instance_logits.argmax(dim=0)  # (C,): one critical instance per class
        queries = self.q(h)  # (N, 128)
        similarity = queries @ self.q(h[critical]).T  # (N, C)
        attention = torch.softmax(similarity / math.sqrt(queries.shape[-1]), dim=0)
        bag_repr = attention.T @ self.v(h)  # (C, 512)
        logits = self.bag_classifier(bag_repr.unsqueeze(0)).squeeze(-1)  # (1, C)
        return {
            "logits": logits,
            "instance_logits": instance_logits,
            "attention": attention,
            "bag_feature": bag_repr,
            "scores": instance_logits.max(dim=1).values,
        }

    @staticmethod
    def max_instance_logits(out: dict[str, Tensor]) -> Tensor:
        """The max-pooling prediction (1, C): per class, the largest instance logit."""
        return out["instance_logits"].max(dim=0, keepdim=True).values

    def loss(self, out: dict[str, Tensor], target: Tensor) -> Tensor:
        """``0.5 · CE(bag logits) + 0.5 · CE(max-over-instances instance logits)`` for a (1,) target."""
        ce = nn.functional.cross_entropy
        return 0.5 * ce(out["logits"], target) + 0.5 * ce(self.max_instance_logits(out), target)

    def probabilities(self, out: dict[str, Tensor]) -> Tensor:
        """Mean of the softmaxes of the bag logits and of the max instance logits, (1, C)."""
        bag = torch.softmax(out["logits"], dim=-1)
        return 0.5 * (bag + torch.softmax(self.max_instance_logits(out), dim=-1))
