"""DTFD-MIL (Zhang et al., CVPR 2022): double-tier feature distillation over random pseudo-bags."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from slidestream.trainers.models.base import MILModel, as_bag
from slidestream.trainers.models.clam import GatedAttention
from slidestream.trainers.models.layers import InstanceEmbedding, init_weights

__all__ = ["DISTILL_MODES", "DTFDMIL"]

DISTILL_MODES = ("AFS", "MaxS", "MaxMinS")


class DTFDMIL(MILModel):
    """DTFD-MIL with one loss.

    Forward on one bag: embed instances (Linear(D→512) + ReLU + Dropout); split them at random into
    ``min(n_groups, N)`` pseudo-bags of near-equal size (the official shuffle + ``array_split``). Tier 1, on
    each pseudo-bag: gated attention (512→128→1, softmax within the pseudo-bag), attention-pooled feature,
    Linear(512→C) → pseudo-bag logits. One feature per pseudo-bag is distilled (``distill``):

    * ``"AFS"``: the attention-pooled feature itself (default);
    * ``"MaxS"``: the instance with the highest class probability, where instance class logits are the
      tier-1 classifier weights applied to the attention-weighted instance (a CAM, no bias, as in the
      official code);
    * ``"MaxMinS"``: the highest and the lowest such instance, kept as two separate tier-2 entries so the
      tier-2 input stays 512-d (a one-instance pseudo-bag gives the same instance twice).

    The ranking class is the last class for C = 2 (the official code always ranks by the last class, which
    is the positive one in binary tasks) and the pseudo-bag's predicted class for C > 2, where "last class"
    would be arbitrary. Tier 2: gated attention over the distilled features → ``bag_feature`` (1, 512) →
    Linear(512→C) → ``logits``.

    ``scores`` (N,): an instance's tier-1 attention times its pseudo-bag's tier-2 attention (for MaxMinS the
    sum of its two entries), so scores sum to 1 over the bag.

    Splits: a ``generator`` passed to forward wins; otherwise training uses the global RNG and eval mode a
    fresh generator seeded with ``eval_seed`` so evaluation is reproducible (the official code reshuffles
    at test time too).

    Loss: mean CE of the pseudo-bag logits (each with the bag label) + CE of the tier-2 logits, summed and
    optimised together; the official code uses two optimizers with gradient clipping at 5 per tier, which
    a trainer may add.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        dropout: float = 0.25,
        n_groups: int = 5,
        distill: str = "AFS",
        eval_seed: int = 0,
    ) -> None:
        super().__init__()
        if n_groups < 1:
            raise ValueError(f"n_groups must be ≥ 1, got {n_groups}")
        if distill not in DISTILL_MODES:
            raise ValueError(f"distill must be one of {', '.join(DISTILL_MODES)}, got {distill!r}")
        self.embed = InstanceEmbedding(in_dim, 512, dropout)
        self.n_classes = n_classes
        self.n_groups = n_groups
        self.distill = distill
        self.eval_seed = eval_seed
        self.attention1 = GatedAttention(512, 128)
        self.classifier1 = nn.Linear(512, n_classes)
        self.attention2 = GatedAttention(512, 128)
        self.head = nn.Linear(512, n_classes)
        init_weights(self)

    def split(self, n: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """Instance indices (CPU, long) of each pseudo-bag: a random permutation cut into near-equal parts."""
        if generator is None and not self.training:
            generator = torch.Generator().manual_seed(self.eval_seed)
        device = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(n, generator=generator, device=device).cpu()
        return list(torch.tensor_split(perm, min(self.n_groups, n)))

    def _distilled(self, h: Tensor, weighted: Tensor, pooled: Tensor, logits: Tensor) -> Tensor:
        """The feature(s) one pseudo-bag hands to tier 2: (1, 512), or (2, 512) for MaxMinS."""
        if self.distill == "AFS":
            return pooled
        cam = weighted @ self.classifier1.weight.t()
        cls = self.n_classes - 1 if self.n_classes == 2 else int(logits.argmax())
        order = torch.argsort(torch.softmax(cam, dim=-1)[:, cls], descending=True)
        picked = order[:1] if self.distill == "MaxS" else torch.cat([order[:1], order[-1:]])
        return h[picked]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Run one bag ``x`` of shape (N, D) or (1, N, D).

        Returns ``logits`` (1, C), ``bag_feature`` (1, 512), ``scores`` (N,), and ``pseudo_logits`` (G, C),
        ``groups`` (N,) (each instance's pseudo-bag), ``distilled`` (G or 2G, 512), ``pseudo_attention``
        (G,) (tier-2 attention per pseudo-bag) and ``instances`` (N, 512).
        """
        h = self.embed(as_bag(x, "DTFDMIL"))
        n = h.shape[0]
        chunks = [idx.to(h.device) for idx in self.split(n, generator)]
        per_entry = 1 if self.distill != "MaxMinS" else 2
        pseudo_logits, distilled, tier1 = [], [], []
        for idx in chunks:
            hg = h[idx]
            a = torch.softmax(self.attention1(hg), dim=0)
            weighted = a.unsqueeze(-1) * hg
            pooled = weighted.sum(dim=0, keepdim=True)
            logits = self.classifier1(pooled)
            pseudo_logits.append(logits)
            distilled.append(self._distilled(hg, weighted, pooled, logits))
            tier1.append(a)
        feats = torch.cat(distilled)
        b = torch.softmax(self.attention2(feats), dim=0)
        bag = (b.unsqueeze(-1) * feats).sum(dim=0, keepdim=True)
        pseudo_attention = b.view(len(chunks), per_entry).sum(dim=1)
        # Scores in split order, then scattered back to the instances' original positions.
        inverse = torch.argsort(torch.cat(chunks))
        scores = torch.cat([a * pseudo_attention[g] for g, a in enumerate(tier1)])[inverse]
        groups = torch.cat([torch.full_like(idx, g) for g, idx in enumerate(chunks)])[inverse]
        return {
            "logits": self.head(bag),
            "bag_feature": bag,
            "scores": scores,
            "pseudo_logits": torch.cat(pseudo_logits),
            "groups": groups,
            "distilled": feats,
            "pseudo_attention": pseudo_attention,
            "instances": h,
        }

    def loss(self, out: dict[str, Tensor], target: Tensor) -> Tensor:
        """Mean CE over the tier-1 pseudo-bag logits (each labelled with the bag label) + tier-2 CE."""
        pseudo = out["pseudo_logits"]
        tier1 = F.cross_entropy(pseudo, target.reshape(1).expand(pseudo.shape[0]))
        return tier1 + F.cross_entropy(out["logits"], target)
