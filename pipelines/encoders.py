"""Frozen tile encoders (CPU or GPU): truncated ResNets from the MIL literature, a small CNN for
64-px tiles (`resnet10t_64`, the architecture `slidestream pretrain-encoder` trains), the pathology
foundation models as named presets (`encoder_presets`) and any timm backbone.

Weights always come from a local file or folder (`encoder_weights`) or are explicitly "random"; nothing
here downloads anything (`pretrained=False` everywhere, no hub calls).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidestream.pipelines.encoder_presets import PRESETS, EncoderPreset, build_preset
from slidestream.pipelines.encoder_weights import (
    RANDOM,
    Convert,
    EncoderError,
    load_weights,
    resolve_weights,
    weights_digest,
)

__all__ = [
    "ENCODER_NAMES",
    "RANDOM",
    "EncoderError",
    "EncoderInfo",
    "TileEncoder",
    "build_encoder",
    "encoder_info",
    "weights_digest",
]

log = logging.getLogger(__name__)

ENCODER_NAMES: tuple[str, ...] = ("resnet50_trunc", "resnet18_trunc", "resnet10t_64", "resnet18_64", *PRESETS)
TIMM_PREFIX = "timm:"  # + any timm model name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name → (timm architecture, feature dim after layer3 + global average pooling, input side)
_TRUNC: dict[str, tuple[str, int, int]] = {
    "resnet50_trunc": ("resnet50", 1024, 224),
    "resnet18_trunc": ("resnet18", 256, 224),
}
# name → (timm architecture, input side): whole timm networks without their classifier, at a native side.
# resnet18_64's state dict is also what CDMA's light network loads as its encoder (`cdma.weights`).
NATIVE_ENCODERS: dict[str, tuple[str, int]] = {
    "resnet10t_64": ("resnet10t", 64),
    "resnet18_64": ("resnet18", 64),
}
_TRUNC_PARTS = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3")
_TRUNC_IGNORED = ("layer4.", "fc.")


@dataclass(frozen=True)
class EncoderInfo:
    name: str  # "resnet50_trunc", "timm:vit_small_patch16_224", ...
    dim: int  # feature dimension D
    input_px: int  # side the model expects
    mean: tuple[float, float, float]  # normalisation of [0, 1] RGB
    std: tuple[float, float, float]
    key: str  # "<safe name>-<sha256[:10] of weights>" or "<safe name>-random-seed<seed>"
    weights: str  # the weights path, or "random"
    resize_px: int = 0  # side a tile is resized to before a centre crop to input_px (0: input_px)
    autocast: bool = True  # bf16 autocast on CUDA is safe for this model

    @property
    def feed_px(self) -> int:
        """The side tiles are resized to before any crop: what the feeding tasks hand the encoder."""
        return self.resize_px or self.input_px


# ------------------------------------------------------------------------------------------ naming


def _safe_name(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def _check_name(name: str) -> None:
    if name in _TRUNC or name in NATIVE_ENCODERS or name in PRESETS:
        return
    if name.startswith(TIMM_PREFIX):
        model = name[len(TIMM_PREFIX) :]
        import timm

        if not model or not timm.is_model(model):
            raise EncoderError(f"encoder {name!r}: {model!r} is not a model known to the installed timm")
        return
    raise EncoderError(
        f"unknown encoder {name!r}; choose one of {', '.join(ENCODER_NAMES)} or 'timm:<model>' "
        "(`slidestream encoders` lists them)"
    )


def _key(name: str, weights: str, seed: int) -> str:
    digest = f"{RANDOM}-seed{seed}" if weights == RANDOM else weights_digest(weights)
    return f"{_safe_name(name)}-{digest}"


# -------------------------------------------------------------------------------------------- info


def _timm_model(model_name: str) -> Any:  # a timm model: num_features, pretrained_cfg, …
    import timm

    return timm.create_model(model_name, pretrained=False, num_classes=0)


def _feature_dim(model: Any) -> int:
    """The width of a classifier-less timm model's output (MobileNetV3 & co. end in a wider hidden layer
    than `num_features`)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def trainable_backbone(name: str) -> nn.Module:
    """A randomly initialised, trainable network of a named encoder whose state dict `build_encoder`
    loads back (what `slidestream pretrain-encoder` trains)."""
    if name not in NATIVE_ENCODERS:
        raise EncoderError(
            f"encoder {name!r} cannot be trained here; choose one of {', '.join(NATIVE_ENCODERS)}"
        )
    return _timm_model(NATIVE_ENCODERS[name][0])


def _rgb(values: Any) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in values)
    return r, g, b


def _timm_data(model: nn.Module) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    if h != w:
        log.warning("model expects %dx%d inputs; tiles are resized to %dx%d", h, w, h, h)
    return int(h), _rgb(cfg["mean"]), _rgb(cfg["std"])


def _preset_info(preset: EncoderPreset, weights: str, seed: int) -> EncoderInfo:
    return EncoderInfo(
        name=preset.name,
        dim=preset.dim,
        input_px=preset.input_px,
        mean=preset.mean,
        std=preset.std,
        key=_key(preset.name, weights, seed),
        weights=weights,
        resize_px=preset.resize_px,
        autocast=preset.bf16,
    )


def encoder_info(name: str, weights: str | os.PathLike | None, seed: int = 0) -> EncoderInfo:
    """The encoder's dims, normalisation and output key, without building it (timm models: on 'meta')."""
    _check_name(name)
    weights = resolve_weights(name, weights)
    if name in PRESETS:
        return _preset_info(PRESETS[name], weights, seed)
    if name in _TRUNC:
        _, dim, px = _TRUNC[name]
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif name in NATIVE_ENCODERS:
        arch, px = NATIVE_ENCODERS[name]
        with torch.device("meta"):
            dim = _feature_dim(_timm_model(arch))
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        model_name = name[len(TIMM_PREFIX) :]
        try:
            with torch.device("meta"):
                model = _timm_model(model_name)
        except Exception:  # some models cannot initialise on meta tensors: build for real
            model = _timm_model(model_name)
        dim = _feature_dim(model)
        px, mean, std = _timm_data(model)
    return EncoderInfo(
        name=name,
        dim=dim,
        input_px=px,
        mean=mean,
        std=std,
        key=_key(name, weights, seed),
        weights=weights,
    )


# ------------------------------------------------------------------------------------------ models


class _TruncatedResNet(nn.Module):
    """A timm ResNet cut after layer3, followed by global average pooling (CLAM-style features)."""

    def __init__(self, arch: str):
        super().__init__()
        import timm

        full = timm.create_model(arch, pretrained=False)
        for part in _TRUNC_PARTS:
            setattr(self, part, getattr(full, part))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in _TRUNC_PARTS:
            x = getattr(self, part)(x)
        return x.mean(dim=(2, 3))


class TileEncoder(nn.Module):
    """A frozen encoder: uint8 RGB tiles → (N, D) float32 features. Always in eval mode."""

    _mean: torch.Tensor  # buffers, registered in __init__
    _std: torch.Tensor

    def __init__(self, model: nn.Module, info: EncoderInfo):
        super().__init__()
        self.model = model
        self.info = info
        self.register_buffer("_mean", torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.register_buffer("_std", torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1), False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TileEncoder:
        """Frozen: batch-norm statistics and dropout stay in inference mode whatever is asked."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def preprocess(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) [or one (H, W, 3) tile] → normalised float32 (N, 3, S, S), S = info.input_px.

        Works on the tensor's device (pass a CUDA tensor to preprocess on the GPU).
        """
        return self._normalised(tiles).contiguous()

    def _normalised(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """`preprocess` without the final copy to contiguous (NCHW) memory: the result is channels-last."""
        x = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) else tiles
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{self.info.name}: tiles must be (N, H, W, 3) RGB, got shape {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            raise ValueError(f"{self.info.name}: tiles must be uint8, got {x.dtype}")
        x = x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        side = self.info.feed_px
        if x.shape[-2:] != (side, side) and x.shape[0] > 0:
            x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        crop = self.info.input_px
        if side > crop:  # centre crop, as torchvision's CenterCrop: the extra row/column goes to the end
            top = (side - crop) // 2
            x = x[:, :, top : top + crop, top : top + crop]
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (N, 3, S, S) → (N, D) float32 features."""
        return self.model(x).float()

    @torch.inference_mode()
    def embed(
        self, tiles: np.ndarray | torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 64
    ) -> np.ndarray:
        """Preprocess + forward in batches (CUDA: channels_last, bf16 autocast where the model allows it) →
        float32 numpy (N, D)."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        self.to(device)
        if cuda:
            self.to(memory_format=torch.channels_last)
        n = len(tiles)
        out = np.empty((n, self.info.dim), dtype=np.float32)
        for start in range(0, n, batch_size):
            batch = tiles[start : start + batch_size]
            batch = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
            x = self._normalised(batch.to(device, non_blocking=cuda))
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.info.autocast):
                    feats = self(x)
            else:
                feats = self(x.contiguous())
            out[start : start + len(batch)] = feats.float().cpu().numpy()
        return out


# ------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class _Network:
    module: nn.Module  # what the TileEncoder runs
    loads_into: nn.Module  # the part a weights file holds (a preset's ViT without its pooling)
    ignored: tuple[str, ...] = ()  # key prefixes of the file the module leaves out
    convert: Convert | None = None  # foreign key layouts → the module's


def _network(name: str) -> _Network:
    if name in PRESETS:
        features = build_preset(PRESETS[name])
        return _Network(features, features.weights_module, convert=features.convert_weights)
    if name in _TRUNC:
        model: nn.Module = _TruncatedResNet(_TRUNC[name][0])
        return _Network(model, model, _TRUNC_IGNORED)
    if name in NATIVE_ENCODERS:
        model = trainable_backbone(name)
        return _Network(model, model)
    model = _timm_model(name[len(TIMM_PREFIX) :])
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    heads = list(classifier) if isinstance(classifier, (list, tuple)) else [classifier] * bool(classifier)
    return _Network(model, model, tuple(f"{h}." for h in heads))


def check_encoder(info: EncoderInfo) -> None:
    """Refuses a weights file that `build_encoder` would refuse, from its shapes alone and the network on
    the `meta` device: run where the work is planned, before any slide is read."""
    if info.weights == RANDOM:
        return
    with torch.device("meta"):
        network = _network(info.name)
    load_weights(
        network.loads_into, info.weights, info.name, network.ignored, network.convert, check_only=True
    )


def build_encoder(name: str, weights: str | os.PathLike | None, seed: int = 0) -> TileEncoder:
    """A frozen TileEncoder on CPU, in eval mode, from local weights or `"random"` (seeded)."""
    info = encoder_info(name, weights, seed)
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's random state
        torch.manual_seed(seed)
        network = _network(name)
    if info.weights != RANDOM:
        load_weights(network.loads_into, info.weights, name, network.ignored, network.convert)
    return TileEncoder(network.module, info)
