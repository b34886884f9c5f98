"""CLAM single-branch (Lu et al., Nature BME 2021): gated attention MIL plus an instance clustering loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from slidestream.trainers.models.base import MILModel, as_bag
from slidestream.trainers.models.layers import InstanceEmbedding, init_weights

__all__ = ["CLAMSB", "GatedAttention"]


class GatedAttention(nn.Module):
    """Gated attention logits ``w · (tanh(V h) ⊙ sigmoid(U h))``, one raw (unnormalised) score per instance.

    Both gates have biases, as in CLAM and DTFD-MIL (ABMIL's variant is bias-free). The output layer has
    none: a constant added to every score cancels in the softmax, so that bias would never learn. ``dropout``
    is applied after each gate (CLAM does this when dropout is on; DTFD-MIL passes 0).
    """

    def __init__(self, in_dim: int = 512, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn_v = nn.Linear(in_dim, hidden)
        self.attn_u = nn.Linear(in_dim, hidden)
        self.drop = nn.Dropout(dropout)
        self.attn_out = nn.Linear(hidden, 1, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        """Raw attention (N,) for instances ``h`` of shape (N, in_dim); softmax is left to the caller."""
        z = self.drop(torch.tanh(self.attn_v(h))) * self.drop(torch.sigmoid(self.attn_u(h)))
        return self.attn_out(z).squeeze(-1)


class CLAMSB(MILModel):
    """CLAM-SB: one gated attention branch, a bag classifier and per-class instance classifiers.

    Forward: ``h = embed(x)`` (N, 512); raw attention from a gated network (512→256→1) with dropout on the
    gates; ``a = softmax_N``; bag feature ``Σ a_i h_i`` → Linear(512→C). ``scores`` is ``a``.

    The instance clustering loss needs the label, so forward returns the embedded instances (``instances``,
    N×512) and the raw attention (``attention_raw``, N) and :meth:`loss` computes it:

    * true class ``y``: the top-k instances by attention are positives (1) and the bottom-k negatives (0)
      for instance classifier ``y`` (Linear(512→2));
    * every other class ``c`` (only with ``subtyping=True``, i.e. mutually exclusive classes): the top-k
      instances are negatives for classifier ``c``; the sum over classes is then divided by C, as in the
      official code.

    We use cross-entropy for the instance loss (the official default is a smooth top-1 SVM loss, which
    needs an extra dependency). Total: ``bag_weight · CE(bag) + (1 − bag_weight) · instance_loss``.

    Small bags: ``k = min(k_sample, N // 2)`` so positives and negatives never overlap (the official code
    fails for N < k_sample). For N = 1 no instance term exists and the loss is the bag CE alone, so such a
    bag keeps its full gradient instead of being scaled down by ``bag_weight``. Instances are ranked by raw
    attention (same order as the softmax, but without ties from underflow in very large bags).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        super().__init__()
        if k_sample < 1:
            raise ValueError(f"k_sample must be ≥ 1, got {k_sample}")
        if not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"bag_weight must be in [0, 1], got {bag_weight}")
        self.embed = InstanceEmbedding(in_dim, 512, dropout)
        self.n_classes = n_classes
        self.k_sample = k_sample
        self.bag_weight = bag_weight
        self.subtyping = subtyping
        self.attention = GatedAttention(512, 256, dropout)
        self.head = nn.Linear(512, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(512, 2) for _ in range(n_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run one bag ``x`` of shape (N, D) or (1, N, D).

        Returns ``logits`` (1, C), ``bag_feature`` (1, 512), ``scores`` (N,) (softmaxed attention), and for
        the loss ``instances`` (N, 512) and ``attention_raw`` (N,).
        """
        h = self.embed(as_bag(x, "CLAMSB"))
        raw = self.attention(h)
        scores = torch.softmax(raw, dim=0)
        bag = (scores.unsqueeze(-1) * h).sum(dim=0, keepdim=True)
        return {
            "logits": self.head(bag),
            "bag_feature": bag,
            "scores": scores,
            "instances": h,
            "attention_raw": raw,
        }

    def instance_k(self, n: int) -> int:
        """Instances taken from each end of the attention ranking for a bag of ``n`` (0: no instance loss)."""
        return min(self.k_sample, n // 2)

    def instance_loss(self, out: dict[str, Tensor], target: Tensor) -> Tensor | None:
        """The instance clustering loss for one bag, or None when the bag is too small (N = 1)."""
        h, raw = out["instances"], out["attention_raw"]
        k = self.instance_k(raw.shape[0])
        if k == 0:
            return None
        label = int(target.reshape(-1)[0])
        order = torch.argsort(raw, descending=True)
        top, bottom = order[:k], order[-k:]
        ones = torch.ones(k, dtype=torch.long, device=h.device)
        zeros = torch.zeros(k, dtype=torch.long, device=h.device)
        # In-class: the most attended instances are evidence for the class, the least attended are not.
        total = F.cross_entropy(
            self.instance_classifiers[label](h[torch.cat([top, bottom])]), torch.cat([ones, zeros])
        )
        if not self.subtyping:
            return total
        # Out-of-class (mutually exclusive classes): what the bag attends to is no evidence for the others.
        for c, classifier in enumerate(self.instance_classifiers):
            if c != label:
                total = total + F.cross_entropy(classifier(h[top]), zeros)
        return total / self.n_classes

    def loss(self, out: dict[str, Tensor], target: Tensor) -> Tensor:
        """``bag_weight · CE(bag) + (1 − bag_weight) · instance_loss``; bag CE alone when N = 1."""
        bag_loss = F.cross_entropy(out["logits"], target)
        inst = self.instance_loss(out, target)
        if inst is None:
            return bag_loss
        return self.bag_weight * bag_loss + (1.0 - self.bag_weight) * inst
