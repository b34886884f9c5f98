"""MTNet (CDMA): a DeepLabv3+ encoder, a shared ASPP and three decoders that differ only in their attention
(decoder 1 CBAM, decoder 2 spatial, decoder 3 channel).

The encoder's BatchNorm is frozen as in the official network (it keeps the ImageNet statistics) or, for a
randomly initialised encoder that has no statistics to keep, trained as usual (`encoder_batchnorm`).

Training returns the three logit maps; evaluation returns decoder 1's alone (the other two are not run).
`MTNetSpec.official()` is the paper's network (ResNet-50, 256-channel ASPP, 48 low-level channels);
`MTNetSpec.light()` is a ResNet-18 with a narrow head for CPU tests and the demo.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ASPP",
    "CBAM",
    "ChannelAttention",
    "Decoder",
    "EncoderBN",
    "FrozenBatchNorm2d",
    "MTNet",
    "MTNetSpec",
    "SpatialAttention",
    "build_mtnet",
    "encoder_batchnorm",
    "undilated_stride16",
]

_GROUPS = 4  # GroupNorm groups everywhere in the head

EncoderBN = Literal["frozen", "train"]


@dataclass(frozen=True)
class MTNetSpec:
    """The network's sizes. `encoder` is a timm ResNet name; the encoder runs at output stride 16 with an
    undilated layer4 (see `undilated_stride16`)."""

    encoder: str = "resnet50"
    aspp_ch: int = 256
    low_ch: int = 48
    decoder_ch: int = 256
    ratio: int = 16  # channel-attention reduction
    dilations: tuple[int, int, int] = (6, 12, 18)

    @classmethod
    def official(cls) -> MTNetSpec:
        return cls()

    @classmethod
    def light(cls) -> MTNetSpec:
        return cls(encoder="resnet18", aspp_ch=64, low_ch=16, decoder_ch=64, ratio=8)

    @classmethod
    def named(cls, name: str) -> MTNetSpec:
        if name == "official":
            return cls.official()
        if name == "light":
            return cls.light()
        raise ValueError(f"cdma.network: unknown network {name!r}; choose official or light")

    def to_dict(self) -> dict:
        return asdict(self)


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that always normalises with its stored running statistics (never updates them), while its
    affine weight and bias stay trainable: the encoder's ImageNet statistics survive batches of 8 tiles."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d inside `module` by a FrozenBatchNorm2d holding the same tensors."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, FrozenBatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def encoder_batchnorm(setting: str, pretrained: bool) -> EncoderBN:
    """The encoder's BatchNorm kind for `cdma.encoder_bn`: `auto` freezes pretrained statistics (the
    official network) and trains BatchNorm of a random encoder, whose frozen running statistics (mean 0,
    variance 1) would leave it without any normalisation."""
    if setting == "auto":
        return "frozen" if pretrained else "train"
    if setting in ("frozen", "train"):
        return setting  # type: ignore[return-value]
    raise ValueError(f"cdma.encoder_bn: unknown kind {setting!r}; choose auto, frozen or train")


def undilated_stride16(encoder: Any) -> nn.Module:
    """Output stride 16 as the official network gets it: layer4 stops downsampling (its strided convs go
    to stride 1) and its 3×3 convs stay undilated. timm's output_stride=16 dilates layer4 by 2 instead,
    which changes every layer4 receptive field the ImageNet weights were trained with."""
    for conv in encoder.layer4.modules():
        if isinstance(conv, nn.Conv2d):
            conv.stride = (1, 1)
    return encoder


def _conv_gn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = 0 if kernel == 1 else dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.GroupNorm(_GROUPS, cout),
        nn.ReLU(inplace=True),
    )


class ChannelAttention(nn.Module):
    """Shared bias-free 1×1-conv MLP on the average- and max-pooled channel vectors, summed, sigmoid."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // ratio)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        peak = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """Channel mean and channel max → 7×7 conv (2→1, no bias) → sigmoid, applied per pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Sequential):
    """Channel attention, then spatial attention."""

    def __init__(self, channels: int, ratio: int = 16) -> None:
        super().__init__(ChannelAttention(channels, ratio), SpatialAttention())


def make_attention(kind: str, channels: int, ratio: int) -> nn.Module:
    if kind == "cbam":
        return CBAM(channels, ratio)
    if kind == "spatial":
        return SpatialAttention()
    if kind == "channel":
        return ChannelAttention(channels, ratio)
    raise ValueError(f"unknown attention {kind!r}")


class ASPP(nn.Module):
    """1×1, three dilated 3×3 and image pooling branches (GroupNorm + ReLU each), fused by a 1×1 conv."""

    def __init__(self, cin: int, ch: int, dilations: tuple[int, int, int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_gn_relu(cin, ch)] + [_conv_gn_relu(cin, ch, 3, d) for d in dilations]
        )
        self.pool = _conv_gn_relu(cin, ch)
        self.project = nn.Sequential(_conv_gn_relu(5 * ch, ch), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1))
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True))
        return self.project(torch.cat(outs, dim=1))


class Decoder(nn.Module):
    """DeepLabv3+ decoder with attention on the concatenated features and after the first 3×3 conv."""

    def __init__(self, attention: str, low_in: int, spec: MTNetSpec, n_classes: int) -> None:
        super().__init__()
        cat = spec.aspp_ch + spec.low_ch
        self.low = _conv_gn_relu(low_in, spec.low_ch)
        self.att1 = make_attention(attention, cat, spec.ratio)
        self.conv1 = nn.Sequential(
            nn.Conv2d(cat, spec.decoder_ch, 3, padding=1, bias=False), nn.GroupNorm(_GROUPS, spec.decoder_ch)
        )
        self.att2 = make_attention(attention, spec.decoder_ch, spec.ratio)
        self.tail = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Conv2d(spec.decoder_ch, spec.decoder_ch, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(spec.decoder_ch, n_classes, 1),
        )

    def forward(self, high: Tensor, low: Tensor, size: tuple[int, int]) -> Tensor:
        low = self.low(low)
        high = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
        x = self.att1(torch.cat([high, low], dim=1))
        x = self.tail(self.att2(self.conv1(x)))
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class MTNet(nn.Module):
    """Encoder (frozen or trainable BN, `encoder_bn`) → ASPP → three attention decoders."""

    ATTENTIONS = ("cbam", "spatial", "channel")

    def __init__(
        self, n_classes: int, spec: MTNetSpec | None = None, encoder_bn: EncoderBN = "frozen"
    ) -> None:
        super().__init__()
        import timm

        self.spec = spec or MTNetSpec.official()
        encoder: Any = timm.create_model(  # a timm features model: feature_info
            self.spec.encoder, pretrained=False, features_only=True, out_indices=(1, 4)
        )
        encoder = undilated_stride16(encoder)
        self.encoder = freeze_batchnorm(encoder) if encoder_bn == "frozen" else encoder
        low_in, high_in = encoder.feature_info.channels()
        self.aspp = ASPP(high_in, self.spec.aspp_ch, self.spec.dilations)
        self.decoders = nn.ModuleList(
            [Decoder(kind, low_in, self.spec, n_classes) for kind in self.ATTENTIONS]
        )
        for module in (self.aspp, self.decoders):
            for sub in module.modules():
                if isinstance(sub, nn.Conv2d):
                    nn.init.kaiming_normal_(sub.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | Tensor:
        low, high = self.encoder(x)
        high = self.aspp(high)
        size = (x.shape[-2], x.shape[-1])
        if not self.training:
            return self.decoders[0](high, low, size)
        return tuple(decoder(high, low, size) for decoder in self.decoders)  # type: ignore[return-value]

    def mixes_images(self) -> bool:
        """Whether a training forward couples the images of a batch: only BatchNorm that normalises with
        batch statistics does (every other layer here works per image)."""
        return any(
            isinstance(m, nn.BatchNorm2d) and not isinstance(m, FrozenBatchNorm2d) for m in self.modules()
        )

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: pretrained (encoder) or new, weights or biases."""
        groups: dict[str, list[nn.Parameter]] = {
            "pretrained_weight": [], "pretrained_bias": [], "new_weight": [], "new_bias": []
        }  # fmt: skip
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            origin = "pretrained" if name.startswith("encoder.") else "new"
            kind = "bias" if name.endswith("bias") else "weight"
            groups[f"{origin}_{kind}"].append(param)
        return groups


def build_mtnet(
    n_classes: int, network: str = "official", weights: Path | None = None, encoder_bn: str = "auto"
) -> MTNet:
    """MTNet by configuration name; `weights` is a local ImageNet state dict for the encoder (None: the
    random init that `cdma.weights: random` asks for, or weights loaded afterwards); `encoder_bn` is the
    `cdma.encoder_bn` setting (`auto` decides by whether `weights` is given, see `encoder_batchnorm`)."""
    kind = encoder_batchnorm(encoder_bn, pretrained=weights is not None)
    model = MTNet(n_classes, MTNetSpec.named(network), kind)
    if weights is not None:
        from slidestream.pipelines.encoder_weights import load_weights

        load_weights(model.encoder, str(weights), f"cdma {network} encoder", ("fc.",))
    return model
