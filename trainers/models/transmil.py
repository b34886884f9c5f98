"""TransMIL-style aggregator: class token, two Nyström-attention layers and a PPEG positional block.

Written for this project from the TransMIL and Nyströmformer papers. Choices where the papers' code leaves
freedom (all documented at the place they are made):

- Nyström attention pads the token sequence with zero tokens at the FRONT to a multiple of the landmark
  count and masks nothing, as the reference Nyström implementation does when no mask is passed. The qkv
  projection has no bias, so padding tokens have zero keys and values: each one takes a share of every
  query's softmax mass (logit 0) and contributes nothing. Short bags (N + 1 < 256 landmarks) are therefore
  handled exactly: every landmark is a single token and the approximation reduces to exact softmax
  attention over the padded sequence.
- PPEG pads the instance tokens to its square grid (at least 7×7) by cyclic repetition of the first
  tokens, runs the convolutions and crops back to the real instances, so the attention layers see each
  instance exactly once (TransMIL's code pads once before the first layer and keeps the duplicates).
- The transformer layers are ``x + attention(LayerNorm(x))`` without a feed-forward block, as in TransMIL.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from slidestream.trainers.models.base import MILModel, as_bag
from slidestream.trainers.models.layers import InstanceEmbedding, init_weights

__all__ = ["PPEG", "NystromAttention", "TransLayer", "TransMIL", "pinv_iterative"]


def pinv_iterative(a: Tensor, iterations: int = 6) -> Tensor:
    """Approximate Moore–Penrose pseudo-inverse of square matrices ``a`` (..., m, m), batched.

    Iterative scheme of the Nyströmformer paper: ``Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞)``, then
    ``Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))``. It is differentiable and needs only matrix products, which
    is why Nyström attention uses it instead of an SVD. Norms are taken per matrix.
    """
    col = a.abs().sum(dim=-2).amax(dim=-1, keepdim=True).unsqueeze(-1)  # ‖A‖₁: largest column sum
    row = a.abs().sum(dim=-1).amax(dim=-1, keepdim=True).unsqueeze(-1)  # ‖A‖∞: largest row sum
    z = a.transpose(-1, -2) / (col * row)
    for _ in range(iterations):
        az = a @ z
        inner = _identity_minus(7.0, az)
        inner = _identity_minus(15.0, az @ inner)
        z = (0.25 * z) @ _identity_minus(13.0, az @ inner)
    return z


def _identity_minus(c: float, m: Tensor) -> Tensor:
    """``c·I − m`` for square matrices: one pass over ``m`` plus a diagonal update (no dense identity),
    which keeps the pseudo-inverse iterations cheap on CPU."""
    out = -m
    out.diagonal(dim1=-2, dim2=-1).add_(c)
    return out


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nyström approximation of the softmax attention matrix.

    ``softmax(QKᵀ) ≈ softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ)`` where the landmarks ``Q̃, K̃`` are
    segment means of ``Q, K``: linear in the sequence length, which matters for bags of 10⁴–10⁵ tiles. A
    depthwise convolution over the value sequence (one kernel per head) is added as a residual.
    """

    def __init__(
        self,
        dim: int = 512,
        heads: int = 8,
        dim_head: int = 64,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if residual_kernel % 2 != 1:
            raise ValueError(f"residual_kernel must be odd to keep the length, got {residual_kernel}")
        self.heads = heads
        self.dim_head = dim_head
        self.n_landmarks = n_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        # No bias: zero padding tokens must stay zero keys and values (see the module docstring).
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def forward(self, x: Tensor, query_row: int | None = None) -> tuple[Tensor, Tensor | None]:
        """Attend over ``x`` (B, n, dim); returns the output (B, n, dim) and, if ``query_row`` is given, that
        token's row of the approximated attention matrix over the n real tokens, shape (B, heads, n)."""
        b, n, _ = x.shape
        m = self.n_landmarks
        pad = (-n) % m
        if pad:
            x = nn.functional.pad(x, (0, 0, pad, 0))  # zero tokens in front
        total = n + pad
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, total, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale
        seg = total // m
        q_land = q.reshape(b, self.heads, m, seg, self.dim_head).mean(dim=-2)
        k_land = k.reshape(b, self.heads, m, seg, self.dim_head).mean(dim=-2)
        attn1 = torch.softmax(q @ k_land.transpose(-1, -2), dim=-1)  # (b, h, total, m)
        attn2 = torch.softmax(q_land @ k_land.transpose(-1, -2), dim=-1)  # (b, h, m, m)
        attn3 = torch.softmax(q_land @ k.transpose(-1, -2), dim=-1)  # (b, h, m, total)
        left = attn1 @ pinv_iterative(attn2, self.pinv_iterations)
        out = left @ (attn3 @ v) + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, total, self.heads * self.dim_head)
        out = self.to_out(out)[:, pad:]
        row = None
        if query_row is not None:
            row = (left[:, :, pad + query_row].unsqueeze(-2) @ attn3).squeeze(-2)[:, :, pad:]
        return out, row


class TransLayer(nn.Module):
    """Pre-LayerNorm residual layer ``x + attention(LayerNorm(x))`` (TransMIL has no feed-forward block)."""

    def __init__(
        self, dim: int = 512, n_landmarks: int = 256, pinv_iterations: int = 6, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, 8, dim // 8, n_landmarks, pinv_iterations, dropout=dropout)

    def forward(self, x: Tensor, query_row: int | None = None) -> tuple[Tensor, Tensor | None]:
        """The layer output (B, n, dim) and optionally one token's attention row (see NystromAttention)."""
        out, row = self.attn(self.norm(x), query_row)
        return x + out, row


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7×7, 5×5 and 3×3 convolutions plus identity on the
    instance tokens laid out row-major on a square grid; the class token (position 0) passes through.

    The grid side is ``max(min_side, ceil(√N))``; the missing cells are filled by repeating the instance
    tokens cyclically from the first one (so N = 1 works), and only the N real positions are kept after the
    convolutions: the output has the input's shape.
    """

    def __init__(self, dim: int = 512, min_side: int = 7) -> None:
        super().__init__()
        self.min_side = min_side
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (B, 1 + N, dim) with the class token first → the same shape."""
        b, length, dim = x.shape
        cls, feats = x[:, :1], x[:, 1:]
        n = length - 1
        side = max(self.min_side, math.isqrt(n - 1) + 1)  # ceil(√N) for N ≥ 1
        index = torch.arange(side * side, device=x.device) % n
        grid = feats[:, index].transpose(1, 2).reshape(b, dim, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        feats = grid.flatten(2).transpose(1, 2)[:, :n]
        return torch.cat([cls, feats], dim=1)


class TransMIL(MILModel):
    """TransMIL aggregator: embed → [cls; h] → layer 0 → PPEG → layer 1 → LayerNorm → cls → Linear head.

    ``scores`` (8, N) are the class token's attention over the instances in layer 0, one row per head, from
    the Nyström-approximated attention matrix restricted to the real instances (without the class token and
    padding), so the rows need not sum to 1.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        dropout: float = 0.25,
        *,
        n_landmarks: int = 256,
        pinv_iterations: int = 6,
        attn_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = InstanceEmbedding(in_dim, 512, dropout)
        self.n_classes = n_classes
        self.cls_token = nn.Parameter(torch.randn(1, 1, 512))
        self.layer1 = TransLayer(512, n_landmarks, pinv_iterations, attn_dropout)
        self.pos = PPEG(512)
        self.layer2 = TransLayer(512, n_landmarks, pinv_iterations, attn_dropout)
        self.norm = nn.LayerNorm(512)
        self.head = nn.Linear(512, n_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Run one bag ``x`` of shape (N, D) or (1, N, D).

        Returns ``logits`` (1, C), ``bag_feature`` (1, 512) (the normalised class token) and ``scores``
        (8, N).
        """
        h = self.embed(as_bag(x, "TransMIL")).unsqueeze(0)
        h = torch.cat([self.cls_token.to(h.dtype), h], dim=1)
        h, row = self.layer1(h, query_row=0)
        h = self.pos(h)
        h, _ = self.layer2(h)
        bag = self.norm(h[:, 0])
        scores = row[0, :, 1:] if row is not None else h.new_empty(0)  # row is always set (query_row given)
        return {"logits": self.head(bag), "bag_feature": bag, "scores": scores}
