"""The networks behind the preset encoders: a timm ViT pooled the way each model card says (class token,
or class token ⊕ mean of the patch tokens), and CONCH v1.5's ViT with its attentional pooler. Each says
which module its weights file fills and how that file's layout maps onto it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from slidestream.pipelines.encoder_weights import to_timm_vit

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

# cls: the class token after the final norm; cls+patch_mean: that ⊕ the mean of the patch tokens (register
# tokens left out); attention: a learned query's attention over every token (CONCH v1.5)
Pooling = Literal["cls", "cls+patch_mean", "attention"]


class ViTFeatures(nn.Module):
    """A timm ViT's tile feature, computed from `forward_features` whatever timm's own pooling. Its weights
    file is the ViT's (timm or DINOv2 layout)."""

    def __init__(self, vit: VisionTransformer, pooling: Pooling) -> None:
        super().__init__()
        self.vit = vit
        self.pooling = pooling

    @property
    def backbone(self) -> VisionTransformer:
        return self.vit

    @property
    def weights_module(self) -> nn.Module:
        return self.vit

    convert_weights = staticmethod(to_timm_vit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        cls = tokens[:, 0]
        if self.pooling == "cls":
            return cls
        patches = tokens[:, self.vit.num_prefix_tokens :]
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooler with one learned query: multi-head attention of the layer-normed query over
    the layer-normed tokens; projections without biases; LayerNorms at PyTorch's default eps."""

    def __init__(self, dim: int, context_dim: int, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Parameter(torch.randn(1, dim))
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, heads, tokens, dim / heads)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, context_dim) → (B, dim)."""
        query = self.to_q(self.ln_q(self.query)).expand(tokens.shape[0], -1, -1)
        keys, values = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        pooled = F.scaled_dot_product_attention(self._heads(query), self._heads(keys), self._heads(values))
        return self.to_out(pooled.transpose(1, 2).flatten(2))[:, 0]


def _dino_positions(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A (1, 1 + n², D) position embedding resampled to `grid` as DINO/iBOT-style ViTs (CONCH v1.5's trunk)
    do at every forward: bicubic by a scale factor of (side + 0.1) / n, no antialiasing."""
    n = math.isqrt(pos.shape[1] - 1)
    patches = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / n, (grid[1] + 0.1) / n)
    patches = F.interpolate(patches.float(), scale_factor=scale, mode="bicubic").to(pos.dtype)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


class AttentionPooledViT(nn.Module):
    """CONCH v1.5's vision tower: a ViT trunk, the attentional pooler over all its tokens, a LayerNorm.
    Module names are those of its weights file (`trunk.`, `attn_pool_contrast.`, `ln_contrast.`)."""

    def __init__(self, trunk: VisionTransformer, dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = AttentionalPooler(dim, trunk.embed_dim)
        self.ln_contrast = nn.LayerNorm(dim)

    @property
    def backbone(self) -> VisionTransformer:
        return self.trunk

    @property
    def weights_module(self) -> nn.Module:
        return self

    @staticmethod
    def convert_weights(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """The file keeps the trunk's position embedding at its 224-px grid; the trunk here is built at its
        input size, so the embedding is resampled once, the way the original resamples it per forward."""
        pos = state.get("trunk.pos_embed")
        trunk = getattr(model, "trunk", None)
        if pos is None or trunk is None or trunk.pos_embed is None or pos.shape == trunk.pos_embed.shape:
            return state
        return {**state, "trunk.pos_embed": _dino_positions(pos, tuple(trunk.patch_embed.grid_size))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x)))


PresetNetwork = ViTFeatures | AttentionPooledViT
