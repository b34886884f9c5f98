"""Attention-based MIL (ABMIL) with an optional gated attention branch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slidestream.trainers.models.base import MILModel, as_bag
from slidestream.trainers.models.layers import InstanceEmbedding, init_weights

__all__ = ["ABMIL"]


class ABMIL(MILModel):
    """ABMIL aggregator.

    Plain attention: ``a = softmax_N(W2 · ReLU(W1 · h))`` with bias-free ``W1: 512→128``, ``W2: 128→1``.
    Gated variant (``gated=True``): ``a = softmax_N(W2 · (tanh(V · h) ⊙ sigmoid(U · h)))`` with bias-free
    ``V, U: 512→128``. The bag feature is ``Σ_i a_i h_i``; logits come from a Linear(512→C) head.
    ``embed_bias=False``: the instance embedding's Linear(D→512) has no bias (ICMIL's reduction layer).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        gated: bool = False,
        dropout: float = 0.25,
        embed_bias: bool = True,
    ) -> None:
        super().__init__()
        self.embed = InstanceEmbedding(in_dim, 512, dropout, bias=embed_bias)
        self.n_classes = n_classes
        self.gated = gated
        if gated:
            self.attn_v = nn.Linear(512, 128, bias=False)
            self.attn_u = nn.Linear(512, 128, bias=False)
        else:
            self.attn_hidden = nn.Linear(512, 128, bias=False)
        self.attn_out = nn.Linear(128, 1, bias=False)
        self.head = nn.Linear(512, n_classes)
        init_weights(self)

    def attention_logits(self, h: Tensor) -> Tensor:
        """Raw attention scores (N,), before the softmax, for embedded instances ``h`` of shape (N, 512)."""
        if self.gated:
            z = torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))
        else:
            z = torch.relu(self.attn_hidden(h))
        return self.attn_out(z).squeeze(-1)

    def attention(self, h: Tensor) -> Tensor:
        """Softmaxed attention over instances, shape (N,), for embedded instances ``h`` of shape (N, 512)."""
        return torch.softmax(self.attention_logits(h), dim=0)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run one bag ``x`` of shape (N, D) or (1, N, D).

        Returns ``logits`` (1, C), ``bag_feature`` (1, 512) and ``scores`` (N,), the softmaxed attention.
        """
        h = self.embed(as_bag(x, "ABMIL"))
        scores = self.attention(h)
        bag = (scores.unsqueeze(-1) * h).sum(dim=0, keepdim=True)
        return {"logits": self.head(bag), "bag_feature": bag, "scores": scores}
