"""Pathology foundation-model tile encoders as named presets: the timm architecture with its exact keyword
arguments, the tiling and normalisation the authors used, and which output makes the feature.

Every number is taken from the model's public card or configuration, named in the comment above the
preset. The weights are the user's local copy of the authors' file (most are gated: accept the licence on
the model's page, download, pass the file or the Hugging Face cache folder as `--weights`); nothing is
downloaded here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from slidestream.pipelines.preset_networks import AttentionPooledViT, Pooling, PresetNetwork, ViTFeatures

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class EncoderPreset:
    name: str
    arch: str  # timm architecture
    kwargs: Mapping[str, Any]  # timm.create_model keyword arguments; layers by name (`_layers`)
    dim: int  # feature dimension
    tile_px: int  # tile side read at `mpp`, then resized to `resize_px`...
    input_px: int  # ...and centre-cropped to this side, the network's input
    licence: str
    card: str  # where the numbers come from
    # the documented architecture, checked against the built network by the tests
    blocks: int
    width: int
    patch: int
    registers: int = 0
    pooling: Pooling = "cls"  # what makes the feature (`preset_networks`)
    mpp: float = 0.5  # µm/px of the tiles the authors embedded
    resize_px: int = 0  # 0: tile_px
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    bf16: bool = True  # bf16 autocast on CUDA keeps the features (the authors run it in half precision)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", MappingProxyType(dict(self.kwargs)))
        if not self.resize_px:
            object.__setattr__(self, "resize_px", self.tile_px)


# ----------------------------------------------------------------------------------------- presets

_NC_GATED = "CC-BY-NC-ND-4.0, gated (request access on the model page)"
_HIBOU_NORM = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
_HOPTIMUS_NORM = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
# SwiGLU: the activation must be named too, or timm's Block hands the MLP its own (GELU)
_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}

# H-optimus-0. huggingface.co/bioptimus/H-optimus-0: config.json (vit_giant_patch14_reg4_dinov2, token
# pooling, 1536 features, its own mean/std) and the card (init_values=1e-5, dynamic_img_size=False;
# "224x224 images extracted at 0.5 microns per pixel"; fp16 autocast recommended).
_H_OPTIMUS_0 = EncoderPreset(
    name="h-optimus-0",
    arch="vit_giant_patch14_reg4_dinov2",
    kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
    dim=1536,
    tile_px=224,
    input_px=224,
    mean=_HOPTIMUS_NORM[0],
    std=_HOPTIMUS_NORM[1],
    licence="Apache-2.0",
    card="https://huggingface.co/bioptimus/H-optimus-0",
    blocks=40,
    width=1536,
    patch=14,
    registers=4,
)

_PRESETS = (
    # UNI. Architecture and kwargs: huggingface.co/MahmoodLab/UNI (card), github.com/mahmoodlab/UNI
    # (README_old.md, uni/get_encoder). Tiling: TRIDENT's preset (github.com/mahmoodlab/TRIDENT README:
    # 256-px tiles at 20x, resized to 224), ImageNet normalisation, class token (1024-d).
    EncoderPreset(
        name="uni",
        arch="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        dim=1024,
        tile_px=256,
        resize_px=224,
        input_px=224,
        licence=_NC_GATED,
        card="https://huggingface.co/MahmoodLab/UNI",
        blocks=24,
        width=1024,
        patch=16,
    ),
    # UNI2-h ("ViT-h/14-reg8"). kwargs: huggingface.co/MahmoodLab/UNI2-h card and github.com/mahmoodlab/UNI
    # README (the timm name is only a base, every size is overridden). Resize(224) + CenterCrop(224),
    # ImageNet; TRIDENT tiles 256 px at 20x and runs it in bf16. Class token, 1536-d.
    EncoderPreset(
        name="uni2-h",
        arch="vit_giant_patch14_224",
        kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        dim=1536,
        tile_px=256,
        resize_px=224,
        input_px=224,
        licence=_NC_GATED,
        card="https://huggingface.co/MahmoodLab/UNI2-h",
        blocks=24,
        width=1536,
        patch=14,
        registers=8,
    ),
    # Virchow2. config.json model_args of huggingface.co/paige-ai/Virchow2 plus the card's
    # mlp_layer=SwiGLUPacked, act_layer=SiLU. Feature per the card: class token ⊕ mean of the patch tokens
    # (tokens 1-4 are registers), 2560-d. Trained on mixed 5-40x; TRIDENT tiles 224 px at 20x.
    # The card runs it under fp16 autocast.
    EncoderPreset(
        name="virchow2",
        arch="vit_huge_patch14_224",
        kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        dim=2560,
        pooling="cls+patch_mean",
        tile_px=224,
        input_px=224,
        licence=_NC_GATED,
        card="https://huggingface.co/paige-ai/Virchow2",
        blocks=32,
        width=1280,
        patch=14,
        registers=4,
    ),
    _H_OPTIMUS_0,
    # H-optimus-1: the same network, tiling and normalisation as H-optimus-0 (github.com/bioptimus/
    # h1-jumpstart README; TRIDENT). Its licence text was not found in the sources read.
    replace(
        _H_OPTIMUS_0,
        name="h-optimus-1",
        licence="gated; Bioptimus terms on the model page",
        card="https://huggingface.co/bioptimus/H-optimus-1",
    ),
    # Prov-GigaPath tile encoder. config.json model_args of huggingface.co/prov-gigapath/prov-gigapath
    # (patch 16 despite the base name; the base supplies SwiGLU + SiLU); github.com/prov-gigapath/
    # prov-gigapath README: Resize(256, bicubic) + CenterCrop(224), ImageNet; 256-px tiles at 0.5 mpp.
    EncoderPreset(
        name="prov-gigapath",
        arch="vit_giant_patch14_dinov2",
        kwargs={
            "img_size": 224,
            "in_chans": 3,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
        },
        dim=1536,
        tile_px=256,
        input_px=224,
        licence="gated (agree to the terms), research use only; code Apache-2.0",
        card="https://huggingface.co/prov-gigapath/prov-gigapath",
        blocks=40,
        width=1536,
        patch=16,
    ),
    # Phikon-v2: a transformers Dinov2Model, ViT-L/16 without registers (huggingface.co/owkin/phikon-v2
    # card: DINOv2 ViT-L/16, 20x tiles, CLS of last_hidden_state, 1024-d), ImageNet normalisation. Its
    # weights are in transformers' layout (remapped on load). TRIDENT runs it in fp32.
    EncoderPreset(
        name="phikon-v2",
        arch="vit_large_patch16_224",
        kwargs={"img_size": 224, "init_values": 1.0},
        dim=1024,
        tile_px=224,
        input_px=224,
        bf16=False,
        licence="Owkin non-commercial licence",
        card="https://huggingface.co/owkin/phikon-v2",
        blocks=24,
        width=1024,
        patch=16,
    ),
    # CONCH v1.5 (TITAN's tile encoder): a ViT-L/16 trunk (LayerScale) whose tokens a single learned query
    # attends over (CoCa's attentional pooler, 8 heads), then a LayerNorm: 768-d. 512-px tiles at 20x,
    # Resize(448) + CenterCrop(448), ImageNet (huggingface.co/MahmoodLab/conchv1_5; TITAN's README;
    # TRIDENT's conch_v15 loader: `pytorch_model_vision.bin`, keys trunk./attn_pool_contrast./ln_contrast.).
    EncoderPreset(
        name="conch-v1.5",
        arch="vit_large_patch16_224",
        kwargs={"img_size": 448, "init_values": 1.0},
        dim=768,
        pooling="attention",
        tile_px=512,
        resize_px=448,
        input_px=448,
        licence=_NC_GATED,
        card="https://huggingface.co/MahmoodLab/conchv1_5",
        blocks=24,
        width=1024,
        patch=16,
    ),
    # Hibou-B / Hibou-L: DINOv2 with 4 registers and SwiGLU (huggingface.co/histai/hibou-b config.json;
    # github.com/HistAI/hibou), pooler output = class token. SwiGLU width as transformers computes it
    # ((int(4·D·2/3) + 7) // 8 · 8 = 2048 / 2736, packed ×2). preprocessor_config.json: 224 px, Hibou
    # mean/std. Magnification: TRIDENT's 20x (no official statement found). TRIDENT runs them in fp32.
    EncoderPreset(
        name="hibou-b",
        arch="vit_base_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1.0, "mlp_ratio": 4096.5 / 768, **_SWIGLU},
        dim=768,
        tile_px=224,
        input_px=224,
        mean=_HIBOU_NORM[0],
        std=_HIBOU_NORM[1],
        bf16=False,
        licence="Apache-2.0",
        card="https://huggingface.co/histai/hibou-b",
        blocks=12,
        width=768,
        patch=14,
        registers=4,
    ),
    EncoderPreset(
        name="hibou-l",
        arch="vit_large_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1.0, "mlp_ratio": 5472.5 / 1024, **_SWIGLU},
        dim=1024,
        tile_px=224,
        input_px=224,
        mean=_HIBOU_NORM[0],
        std=_HIBOU_NORM[1],
        bf16=False,
        licence="Apache-2.0",
        card="https://huggingface.co/histai/hibou-L",
        blocks=24,
        width=1024,
        patch=14,
        registers=4,
    ),
)

PRESETS: Mapping[str, EncoderPreset] = MappingProxyType({p.name: p for p in _PRESETS})


# ------------------------------------------------------------------------------------------ models


def _layers() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"swiglu_packed": SwiGLUPacked, "silu": nn.SiLU}


def preset_kwargs(preset: EncoderPreset) -> dict[str, Any]:
    """The preset's timm keyword arguments with layer names resolved to classes."""
    layers = _layers()
    return {k: layers[v] if k.endswith("_layer") else v for k, v in preset.kwargs.items()}


def build_preset(preset: EncoderPreset) -> PresetNetwork:
    """The preset's network, randomly initialised (on the current default device: `meta` builds giants
    without memory)."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    vit = timm.create_model(preset.arch, pretrained=False, num_classes=0, **preset_kwargs(preset))
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"preset {preset.name!r}: timm built a {type(vit).__name__}, not a VisionTransformer")
    if preset.pooling == "attention":
        return AttentionPooledViT(vit, preset.dim)
    return ViTFeatures(vit, preset.pooling)


def parameter_count(preset: EncoderPreset) -> int:
    """Parameters of the preset's network, counted on the `meta` device (no memory, no init)."""
    with torch.device("meta"):
        network = build_preset(preset)
    return sum(p.numel() for p in network.parameters())


def preset_rows() -> list[dict[str, Any]]:
    """One row per preset, for `slidestream encoders`."""
    return [
        {
            "name": p.name,
            "dim": p.dim,
            "input_px": p.input_px,
            "tile_px": p.tile_px,
            "resize_px": p.resize_px,
            "mpp": p.mpp,
            "params_m": round(parameter_count(p) / 1e6),
            "feature": p.pooling,
            "licence": p.licence,
            "card": p.card,
        }
        for p in PRESETS.values()
    ]
