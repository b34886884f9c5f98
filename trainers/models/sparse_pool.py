"""Giga-SSL's slide encoder: ResNet-18 layer4 made sparse (spconv), pooled over active sites, + projector.

Input: a sparse 2-D map per slide whose active sites hold tile features (`trainers/gigassl/sparse_maps.py`).
Block 0 (256 → 512, stride 2): strided 3×3 conv → BN → ReLU → submanifold 3×3 → BN, plus the shortcut
3×3 stride-2 average pooling (÷ 9, a frozen strided conv with identity/9 taps) → submanifold 1×1 → BN;
add; ReLU. Block 1: two submanifold 3×3 with BN/ReLU and an identity shortcut. BatchNorm runs over all
active sites. The slide embedding h is the mean over the output's active sites (512-d).

A submanifold 1×1 convolution is a Linear map of each active site's features, so it is one here
(spconv's 1×1 kernels also keep their weights in a different memory layout than larger ones).
"""

from __future__ import annotations

import io

import torch
from torch import nn

from slidestream.cluster.storage import read_bytes
from slidestream.trainers.spconv_compat import spconv as sp

__all__ = ["GigaSSLNet", "Projector", "SparseResNetPool", "load_resnet18_layer4", "site_keys"]

_SUBM = "subm"


def site_keys(indices: torch.Tensor, spatial_shape: list[int]) -> torch.Tensor:
    """One integer per site (batch, row, col): equal keys are the same site."""
    idx = indices.long()
    return (idx[:, 0] * spatial_shape[0] + idx[:, 1]) * spatial_shape[1] + idx[:, 2]


def _align(tensor, reference):
    """`tensor`'s features reordered to `reference`'s site order (both hold the same set of sites)."""
    keys = site_keys(tensor.indices, tensor.spatial_shape)
    ref = site_keys(reference.indices, reference.spatial_shape)
    if keys.shape != ref.shape:
        raise RuntimeError(f"shortcut has {len(keys)} sites, main branch {len(ref)}")
    order = torch.empty_like(ref)
    order[torch.argsort(ref)] = torch.argsort(keys)
    return tensor.features[order]


def _bn(x, norm: nn.BatchNorm1d, relu: bool = False):
    features = norm(x.features)
    return x.replace_feature(torch.relu(features) if relu else features)


class SparseResNetPool(nn.Module):
    """The sparse ResNet-18 layer4 (in_dim → dim) and the mean over active sites → (B, dim)."""

    def __init__(self, in_dim: int = 256, dim: int = 512) -> None:
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        self.conv1 = sp.SparseConv2d(in_dim, dim, 3, stride=2, padding=0, bias=False)
        self.bn1 = nn.BatchNorm1d(dim)
        self.conv2 = sp.SubMConv2d(dim, dim, 3, padding=1, bias=False, indice_key=_SUBM)
        self.bn2 = nn.BatchNorm1d(dim)
        self.pool = sp.SparseConv2d(in_dim, in_dim, 3, stride=2, padding=0, bias=False)
        with torch.no_grad():
            self.pool.weight.copy_(torch.eye(in_dim)[:, None, None, :] / 9.0)  # (out, kh, kw, in) taps
        self.pool.weight.requires_grad_(False)
        self.short = nn.Linear(in_dim, dim, bias=False)  # the shortcut's submanifold 1×1
        self.bn_short = nn.BatchNorm1d(dim)
        self.conv3 = sp.SubMConv2d(dim, dim, 3, padding=1, bias=False, indice_key=_SUBM)
        self.bn3 = nn.BatchNorm1d(dim)
        self.conv4 = sp.SubMConv2d(dim, dim, 3, padding=1, bias=False, indice_key=_SUBM)
        self.bn4 = nn.BatchNorm1d(dim)

    def blocks(self, x):
        """The layer4 output as a sparse tensor (stride 2: half the map)."""
        out = _bn(self.conv1(x), self.bn1, relu=True)
        out = _bn(self.conv2(out), self.bn2)
        shortcut = self.bn_short(self.short(_align(self.pool(x), out)))
        out = out.replace_feature(torch.relu(out.features + shortcut))
        inner = _bn(self.conv3(out), self.bn3, relu=True)
        inner = _bn(self.conv4(inner), self.bn4)
        return out.replace_feature(torch.relu(inner.features + out.features))

    def forward(self, x) -> torch.Tensor:
        out = self.blocks(x)
        batch = out.indices[:, 0].long()
        sums = out.features.new_zeros(x.batch_size, self.dim).index_add_(0, batch, out.features)
        counts = torch.bincount(batch, minlength=x.batch_size).clamp_min(1).to(sums.dtype)
        return sums / counts[:, None]


class Projector(nn.Module):
    """Linear → ReLU → BN, twice, then Linear (512 → 512 → 512 → 256 by default)."""

    def __init__(self, dim: int = 512, hidden: int = 512, out: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.BatchNorm1d(hidden),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.BatchNorm1d(hidden),
            nn.Linear(hidden, out),
        )  # fmt: skip

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class GigaSSLNet(nn.Module):
    """Sparse pooling network + projector: `forward` gives the slide embeddings h and projections z."""

    def __init__(self, in_dim: int = 256, dim: int = 512, proj_dim: int = 256) -> None:
        super().__init__()
        self.pool = SparseResNetPool(in_dim, dim)
        self.projector = Projector(dim, dim, proj_dim)

    def forward(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pool(x)
        return h, self.projector(h)


# torchvision ResNet-18 layer4 parameter → ours (3×3 convs change layout (out, in, k, k) → (out, k, k, in)).
_LAYER4 = {
    "0.conv1": "conv1", "0.bn1": "bn1", "0.conv2": "conv2", "0.bn2": "bn2",
    "0.downsample.0": "short", "0.downsample.1": "bn_short",
    "1.conv1": "conv3", "1.bn1": "bn3", "1.conv2": "conv4", "1.bn2": "bn4",
}  # fmt: skip
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def load_resnet18_layer4(pool: SparseResNetPool, path: str) -> None:
    """Initialise from a local torchvision ResNet-18 state dict (`layer4.*` keys; a `state_dict` or
    `model` entry, or a `module.` prefix, are unwrapped). Needs in_dim 256 and dim 512."""
    try:
        state = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"gigassl.init_weights: cannot read {path}: {exc}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if (pool.in_dim, pool.dim) != (256, 512):
        raise ValueError(
            f"gigassl.init_weights: ResNet-18 layer4 maps 256 → 512 features, but the tile features are "
            f"{pool.in_dim}-d (use an encoder with 256-d features, e.g. resnet18_trunc, or "
            "gigassl.init_weights=random)"
        )
    with torch.no_grad():
        for theirs, ours in _LAYER4.items():
            module = getattr(pool, ours)
            names = _BN_KEYS if isinstance(module, nn.BatchNorm1d) else ("weight",)
            for name in names:
                key = f"layer4.{theirs}.{name}"
                if key not in state:
                    raise ValueError(f"gigassl.init_weights: {path} has no {key!r} (not a ResNet-18?)")
                value = state[key].float()
                if name == "weight" and value.ndim == 4:
                    value = value[:, :, 0, 0] if ours == "short" else value.permute(0, 2, 3, 1)
                target = getattr(module, name)
                if target.shape != value.shape:
                    raise ValueError(f"gigassl.init_weights: {key} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(target.shape)}")  # fmt: skip
                target.copy_(value)
