"""Small building blocks shared by the MIL models."""

from __future__ import annotations

from torch import nn

__all__ = ["InstanceEmbedding", "init_weights"]


def init_weights(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every ``nn.Linear`` inside ``module``."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_normal_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


class InstanceEmbedding(nn.Sequential):
    """Per-instance projection: Linear(D→hidden) + ReLU + Dropout."""

    def __init__(self, in_dim: int, hidden: int = 512, dropout: float = 0.25) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.in_dim = in_dim
        self.hidden = hidden
