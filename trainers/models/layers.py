"""Small building blocks shared by the MIL models."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["InstanceEmbedding", "init_weights"]


def init_weights(module: nn.Module) -> None:
    """Xavier-normal weights and zero biases for every ``nn.Linear`` inside ``module``."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.xavier_normal_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


class InstanceEmbedding(nn.Sequential):
    """Per-instance projection: Linear(D→hidden) + ReLU + Dropout, after an optional feature z-score.

    The z-score statistics are buffers (identity until `set_statistics`), so they travel with the weights:
    a model trained on standardised features applies the same standardisation when it predicts.
    """

    def __init__(self, in_dim: int, hidden: int = 512, dropout: float = 0.25, bias: bool = True) -> None:
        super().__init__(nn.Linear(in_dim, hidden, bias=bias), nn.ReLU(), nn.Dropout(dropout))
        self.in_dim = in_dim
        self.hidden = hidden
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    feature_mean: Tensor  # buffers, registered in __init__
    feature_std: Tensor

    def set_statistics(self, mean: Tensor, std: Tensor) -> None:
        """Standardise inputs as (x − mean) / std from now on (std floored at 1e-6)."""
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_std.copy_(std.to(self.feature_std).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward((x - self.feature_mean) / self.feature_std)
