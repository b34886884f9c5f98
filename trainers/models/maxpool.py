"""Max-pooling MIL: instance embedding, element-wise max over the bag, linear head."""

from __future__ import annotations

from torch import Tensor, nn

from slidestream.trainers.models.base import MILModel, as_bag
from slidestream.trainers.models.layers import InstanceEmbedding, init_weights

__all__ = ["MaxPoolMIL"]


class MaxPoolMIL(MILModel):
    """``h = ReLU(W·x)`` per instance (512-d), bag feature ``max_N h`` per dimension, Linear(512→C) head.

    ``scores`` (N,): the share of the 512 dimensions in which an instance holds the bag maximum, i.e. how
    much of the bag feature it supplies (sums to ≥ 1 over the bag; ties count for every holder).
    """

    def __init__(self, in_dim: int, n_classes: int = 2, dropout: float = 0.25) -> None:
        super().__init__()
        self.embed = InstanceEmbedding(in_dim, 512, dropout)
        self.n_classes = n_classes
        self.head = nn.Linear(512, n_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.embed(as_bag(x, "MaxPoolMIL"))
        bag = h.max(dim=0, keepdim=True).values
        scores = (h == bag).float().mean(dim=-1)
        return {"logits": self.head(bag), "bag_feature": bag, "scores": scores}
