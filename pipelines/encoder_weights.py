"""Weights for the tile encoders, from local files only: one file (.safetensors / .pt / .pth / .bin /
.ckpt), a sharded checkpoint (its `*.index.json`), or a directory (a model folder or a Hugging Face hub
cache entry, `models--org--name`). Hugging Face transformers' DINOv2 key layout is mapped onto timm's
VisionTransformer, and a file that does not fit the model exactly is refused, naming the first mismatches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slidestream.cluster.errors import SlidestreamError

RANDOM = "random"
# A model folder's weights, in the order a folder holding several is read.
_FOLDER_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# wrappers around the network: DataParallel, training modules, our TileEncoder (model.) and preset ViT (vit.)
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "vit.")
_CONTAINER_KEYS = ("state_dict", "model")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class EncoderError(SlidestreamError, ValueError):
    """An encoder could not be built: unknown name, missing or unusable weights file."""


# ------------------------------------------------------------------------------------------ finding


def _hub_snapshot(folder: Path) -> Path | None:
    """The snapshot a Hugging Face hub cache entry (`models--org--name`) points at: `refs/main`, else
    its only snapshot."""
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = folder / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    found = sorted(p for p in snapshots.iterdir() if p.is_dir())
    return found[0] if len(found) == 1 else None


def _weights_in_folder(name: str, folder: Path) -> Path:
    snapshot = _hub_snapshot(folder)
    where = snapshot or folder
    for candidate in _FOLDER_FILES:
        if (where / candidate).is_file():
            return where / candidate
    raise EncoderError(
        f"encoder {name!r}: folder {str(folder)!r} holds none of {', '.join(_FOLDER_FILES)}"
        + ("" if snapshot else " (nor a Hugging Face cache entry with one snapshot or refs/main)")
    )


def resolve_weights(name: str, weights: str | os.PathLike | None) -> str:
    """The weights file a `--weights` value names (a folder resolves to the file inside), or "random"."""
    if weights is None:
        raise EncoderError(
            f"encoder {name!r}: no weights given; pass a local weights file (.pt/.pth/.bin/.safetensors), "
            f"a model folder or Hugging Face cache entry, or the literal {RANDOM!r} for random "
            "initialisation (random weights are never implied)"
        )
    weights = os.fspath(weights)
    if weights == RANDOM:
        return RANDOM
    path = Path(weights).expanduser()
    if path.is_dir():
        return str(_weights_in_folder(name, path))
    if not path.is_file():
        raise EncoderError(f"encoder {name!r}: weights file {weights!r} does not exist or is not a file")
    return str(path)


def _shards(path: str) -> list[str]:
    """The files that hold a checkpoint: the file itself, or the shards its `*.index.json` lists."""
    if not path.endswith(".index.json"):
        return [path]
    index = json.loads(Path(path).read_text())
    names = sorted(set(index.get("weight_map", {}).values()))
    if not names:
        raise EncoderError(f"sharded checkpoint index {path!r} lists no shards (no weight_map)")
    return [str(Path(path).parent / n) for n in names]


def weights_digest(path: str | os.PathLike) -> str:
    """First 10 hex digits of the sha256 of a weights file (of its shards in order, for an index). Hashed
    once per process while the file keeps its size and modification time (a foundation model's file is
    several GB, and the driver and every actor ask)."""
    path = os.fspath(path)
    stat = os.stat(path)
    return _digest(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    for shard in _shards(path):
        with open(shard, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:10]


# ------------------------------------------------------------------------------------------ reading


def _read_one(path: str, name: str) -> Mapping[str, Any]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        hint = (
            ""
            if path.endswith((*_TORCH_SUFFIXES, ".safetensors"))
            else " (expected .pt/.pth/.bin or .safetensors)"
        )
        raise EncoderError(f"encoder {name!r}: cannot read weights file {path!r}{hint}: {exc}") from exc


def _unwrap(obj: Any) -> Any:
    """{"state_dict": {...}} / {"model": {...}} wrappers, possibly nested."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def _read_shapes(path: str, name: str) -> Any:
    """A file's tensors as `meta` tensors of their shapes and dtypes, without reading the data: safetensors'
    header, or a memory-mapped torch file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                keys = f.keys()  # a safetensors handle is not a mapping
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in keys}
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not mappable (a legacy torch file): read it whole, the error names the file if bad
        obj = _read_one(path, name)
    obj = _unwrap(obj)
    if not isinstance(obj, Mapping):
        return obj
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in obj.items()}


def read_state_dict(path: str, name: str, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file (or of a sharded checkpoint), unwrapped from training containers;
    `shapes_only`: as `meta` tensors, the data left unread."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in _shards(path):
        obj = _read_shapes(shard, name) if shapes_only else _unwrap(_read_one(shard, name))
        if not isinstance(obj, Mapping):
            raise EncoderError(f"encoder {name!r}: weights file {shard!r} does not hold a state dict")
        tensors.update({str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)})
    if not tensors:
        raise EncoderError(f"encoder {name!r}: weights file {path!r} holds no tensors")
    return tensors


# -------------------------------------------------------------------- Hugging Face DINOv2 → timm ViT

# transformers' Dinov2 / Dinov2WithRegisters names (v4 files; v5 in-memory names) → the original DINOv2
# names, which timm's own ViT checkpoint filter then converts (registers, SwiGLU, mask token).
_HF_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
}
_HF_QKV = {  # query, key, value parts of timm's fused qkv
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+?)(?:\.(weight|bias))?$")


def is_hf_dinov2(state: Mapping[str, torch.Tensor]) -> bool:
    return "embeddings.patch_embeddings.projection.weight" in state


def hf_dinov2_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' DINOv2 layout → the original DINOv2 layout. Keys it does not know are kept as they
    are, so the strict check names them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    for key, value in state.items():
        if key in _HF_EMBEDDINGS:
            out[_HF_EMBEDDINGS[key]] = value
            continue
        match = _HF_LAYER.match(key)
        part, kind = (match.group(2), match.group(3)) if match else ("", None)
        if match and part in _HF_QKV and kind:
            qkv.setdefault((int(match.group(1)), kind), [None, None, None])[_HF_QKV[part]] = value
        elif match and part in _HF_BLOCK:
            suffix = f".{kind}" if kind else ""
            out[f"blocks.{match.group(1)}.{_HF_BLOCK[part]}{suffix}"] = value
        else:
            out[key] = value
    for (block, kind), parts in qkv.items():
        if any(p is None for p in parts):
            missing = [n for n, p in zip(("query", "key", "value"), parts, strict=True) if p is None]
            raise EncoderError(
                f"transformers DINOv2 weights: block {block} lacks its {'/'.join(missing)} {kind}"
            )
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([p for p in parts if p is not None], dim=0)
    return out


def _hf_positions_on_grid(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """transformers keeps a DINOv2's position embedding at its training grid (often 37 × 37, 518 px) and
    resamples it at every forward to the input's grid (bicubic, no antialiasing, float32). The preset's
    network is declared at its input size, so the same resampling is done once here."""
    pos = state.get("pos_embed")
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if pos is None or grid is None or pos.shape[1] - 1 == grid[0] * grid[1]:
        return state
    side = round((pos.shape[1] - 1) ** 0.5)
    if side * side != pos.shape[1] - 1:
        return state  # not a square grid: the strict check reports the shape
    patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False).to(pos.dtype)
    resampled = torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)
    return {**state, "pos_embed": resampled}


_ORIGINAL_MLP = {".mlp.w12.": ".mlp.fc1.", ".mlp.w3.": ".mlp.fc2."}  # SwiGLU: timm's packed GluMlp


def to_timm_vit(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """DINOv2 layouts (transformers' or the original) → timm VisionTransformer keys; timm layouts pass
    through. The mask token only serves training. With register tokens and a model whose position
    embedding leaves out the class token (`no_embed_class`), the class token's position is folded into the
    token, which is the same sum the original adds at every forward."""
    out = _hf_positions_on_grid(hf_dinov2_to_original(state), model) if is_hf_dinov2(state) else dict(state)
    out.pop("mask_token", None)
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        if getattr(model, "no_embed_class", False) and "pos_embed" in out and "cls_token" in out:
            pos = out.pop("pos_embed")
            out["cls_token"] = out["cls_token"] + pos[:, :1]
            out["pos_embed"] = pos[:, 1:]
    for old, new in _ORIGINAL_MLP.items():
        out = {k.replace(old, new): v for k, v in out.items()}
    return out


# ------------------------------------------------------------------------------------------ fitting


def _strip(key: str, wanted: set[str]) -> str:
    """Drop wrapper prefixes (`_STRIP_PREFIXES`) unless the key already names a model entry."""
    while key not in wanted:
        prefix = next((p for p in _STRIP_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            break
        key = key[len(prefix) :]
    return key


def _few(keys: list[str], n: int = 6) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > n else "")


Convert = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


def load_weights(
    model: nn.Module,
    path: str,
    name: str,
    ignored_prefixes: tuple[str, ...] = (),
    convert: Convert | None = None,
    check_only: bool = False,
) -> None:
    """Load a weights file into `model`, all or nothing: every model entry must come from the file with its
    shape, and every key of the file must be used (or start with one of `ignored_prefixes`, the parts a
    truncated or headless model leaves out). `convert` maps a foreign layout onto the model's keys.

    `check_only`: only find what would be refused, from the file's shapes alone (`model` may be on `meta`),
    cheap enough to run before any slide is read, even for a multi-GB file."""
    loaded = _fitted(model, path, name, ignored_prefixes, convert, check_only)
    if not check_only:
        model.load_state_dict(loaded, strict=True)


def _fitted(
    model: nn.Module,
    path: str,
    name: str,
    ignored_prefixes: tuple[str, ...],
    convert: Convert | None,
    shapes_only: bool,
) -> dict[str, torch.Tensor]:
    """The file's entries for `model`'s keys, or an EncoderError listing what does not fit."""
    expected = model.state_dict()
    wanted = set(expected)
    state = {_strip(k, wanted): v for k, v in read_state_dict(path, name, shapes_only).items()}
    if convert is not None:
        state = convert(state, model)
    loaded = {k: v for k, v in state.items() if k in wanted}
    unexpected = [k for k in state if k not in wanted and not k.startswith(ignored_prefixes)]
    missing = [k for k in expected if k not in loaded]
    mismatched = [
        f"{k} {tuple(loaded[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in loaded and loaded[k].shape != expected[k].shape
    ]
    problems = [
        f"{label}: {_few(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (file vs model)", mismatched),
        )
        if keys
    ]
    if problems:
        raise EncoderError(
            f"encoder {name!r}: weights file {path!r} does not fit the model; {'; '.join(problems)}"
        )
    return loaded
