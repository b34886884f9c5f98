"""Weights for the preset encoders: the real key layouts load (timm's, and transformers' DINOv2 through the
remap, checked against transformers' own forward), a wrong file is refused naming the preset and the
first mismatches, folders and Hugging Face cache entries resolve to their file, keys follow the content."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers  # a test dependency: the remap is checked against transformers' own forward
from safetensors.torch import save_file

from slidestream.pipelines.encoder_presets import PRESETS, EncoderPreset, build_preset
from slidestream.pipelines.encoder_weights import (
    EncoderError,
    load_weights,
    resolve_weights,
    to_timm_vit,
    weights_digest,
)
from slidestream.pipelines.encoders import encoder_info
from slidestream.pipelines.preset_networks import AttentionalPooler, AttentionPooledViT, PresetNetwork

# The same architectures as the presets, narrowed and shortened (same key layout, small files).
SMALL = {"embed_dim": 96, "depth": 2, "num_heads": 4}


def _small(name: str) -> EncoderPreset:
    preset = PRESETS[name]
    return replace(preset, kwargs={**preset.kwargs, **SMALL})


def _seeded(preset: EncoderPreset, seed: int) -> PresetNetwork:
    torch.manual_seed(seed)
    return build_preset(preset).eval()


def _features(model: PresetNetwork, px: int) -> torch.Tensor:
    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", ["uni", "uni2-h", "virchow2", "h-optimus-0", "conch-v1.5"])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_timm_layout_loads_exactly(tmp_path: Path, name: str, suffix: str) -> None:
    preset = _small(name)
    source = _seeded(preset, 1)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.weights_module.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    target = _seeded(preset, 2)
    load_weights(target.weights_module, str(path), name, convert=target.convert_weights)
    torch.testing.assert_close(_features(target, preset.input_px), _features(source, preset.input_px))


def _refusal(tmp_path: Path, state: dict[str, torch.Tensor]) -> str:
    path = tmp_path / "wrong.safetensors"
    save_file(state, path)
    with pytest.raises(EncoderError) as err:
        load_weights(_seeded(_small("uni"), 0).weights_module, str(path), "uni", convert=to_timm_vit)
    message = str(err.value)
    with torch.device("meta"), pytest.raises(EncoderError) as checked:  # from the file's header alone
        load_weights(
            build_preset(_small("uni")).weights_module, str(path), "uni", convert=to_timm_vit, check_only=True
        )
    assert str(checked.value) == message
    assert message.startswith("encoder 'uni': weights file") and "wrong.safetensors" in message
    return message


def test_a_wrong_file_is_refused_naming_the_preset_and_the_mismatches(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in _seeded(_small("uni"), 1).weights_module.state_dict().items()}

    missing = _refusal(tmp_path, {k: v for k, v in state.items() if k != "blocks.1.attn.qkv.weight"})
    assert "missing keys: blocks.1.attn.qkv.weight" in missing

    extra = _refusal(tmp_path, {**state, "head.weight": torch.zeros(2, 96)})
    assert "unexpected keys: head.weight" in extra

    wrong = _refusal(tmp_path, {**state, "blocks.0.mlp.fc1.weight": torch.zeros(128, 96)})
    assert "shape mismatches (file vs model): blocks.0.mlp.fc1.weight (128, 96) vs (384, 96)" in wrong


@pytest.mark.parametrize(
    ("name", "registers", "swiglu", "grid_px"),
    [
        ("phikon-v2", 0, False, 224),  # ViT-L/16 without registers
        ("phikon-v2", 0, False, 518),  # position embedding kept at 518 px, resampled to the input
        ("hibou-b", 4, True, 224),  # 4 registers and SwiGLU (transformers' Dinov2WithRegisters)
    ],
)
def test_transformers_dinov2_layout_is_remapped(
    tmp_path: Path, name: str, registers: int, swiglu: bool, grid_px: int
) -> None:
    preset = _small(name)
    patch = preset.kwargs.get("patch_size") or PRESETS[name].patch
    common = {
        "hidden_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": patch,
        "image_size": grid_px,
        "use_swiglu_ffn": swiglu,
    }
    torch.manual_seed(3)
    if registers:
        hf = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        )
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    cache = tmp_path / "models--org--model"
    hf.save_pretrained(cache / "snapshots" / "abc123")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("abc123")

    path = resolve_weights(name, cache)
    assert path == str(cache / "snapshots" / "abc123" / "model.safetensors")
    with torch.device("meta"):  # the remap also runs on shapes alone (the check before any slide is read)
        load_weights(build_preset(preset).weights_module, path, name, convert=to_timm_vit, check_only=True)
    ours = _seeded(preset, 0)
    load_weights(ours.weights_module, path, name, convert=to_timm_vit)
    x = torch.randn(2, 3, preset.input_px, preset.input_px, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = hf.eval()(pixel_values=x).pooler_output
        got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_folders_resolve_and_keys_follow_the_content(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in _seeded(_small("uni"), 1).weights_module.state_dict().items()}
    folder = tmp_path / "uni"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    assert resolve_weights("uni", folder) == str(folder / "pytorch_model.bin")
    key = encoder_info("uni", folder).key
    assert key == f"uni-{weights_digest(folder / 'pytorch_model.bin')}"
    assert encoder_info("uni", folder / "pytorch_model.bin").key == key
    assert encoder_info("virchow2", folder).key != key  # same file, another encoder

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        EncoderError, match=r"encoder 'uni': folder .*empty.* holds none of model\.safetensors"
    ):
        resolve_weights("uni", empty)


def test_conch_pooler_is_multi_head_attention_of_one_query() -> None:
    """Checked against torch's own MultiheadAttention holding the same projections."""
    torch.manual_seed(0)
    pooler = AttentionalPooler(dim=96, context_dim=64, heads=8).eval()
    reference = torch.nn.MultiheadAttention(96, 8, kdim=64, vdim=64, bias=False, batch_first=True).eval()
    with torch.no_grad():
        reference.q_proj_weight.copy_(pooler.to_q.weight)
        reference.k_proj_weight.copy_(pooler.to_kv.weight[:96])
        reference.v_proj_weight.copy_(pooler.to_kv.weight[96:])
        reference.out_proj.weight.copy_(pooler.to_out.weight)
        tokens = torch.randn(3, 10, 64)
        query = pooler.ln_q(pooler.query).expand(3, -1, -1)
        keys = pooler.ln_k(tokens)
        want = reference(query, keys, keys, need_weights=False)[0][:, 0]
        torch.testing.assert_close(pooler(tokens), want, atol=1e-6, rtol=1e-5)


def test_conch_file_layout_and_position_resampling() -> None:
    with torch.device("meta"):
        conch = build_preset(PRESETS["conch-v1.5"])
    assert isinstance(conch, AttentionPooledViT)
    head = {k: tuple(v.shape) for k, v in conch.state_dict().items() if not k.startswith("trunk.")}
    assert head == {
        "attn_pool_contrast.query": (1, 768),
        "attn_pool_contrast.ln_k.weight": (1024,),
        "attn_pool_contrast.ln_k.bias": (1024,),
        "attn_pool_contrast.ln_q.weight": (768,),
        "attn_pool_contrast.ln_q.bias": (768,),
        "attn_pool_contrast.to_q.weight": (768, 768),
        "attn_pool_contrast.to_kv.weight": (1536, 1024),
        "attn_pool_contrast.to_out.weight": (768, 768),
        "ln_contrast.weight": (768,),
        "ln_contrast.bias": (768,),
    }
    assert tuple(conch.trunk.pos_embed.shape) == (1, 1 + 28 * 28, 1024)  # built at its 448-px input

    # The file's trunk position embedding is on the 224-px grid (14 × 14); the original resamples it at
    # every forward by a scale factor of (28 + 0.1) / 14, bicubic: loading does the same, once.
    pos = torch.randn(1, 1 + 14 * 14, 8)
    loaded = AttentionPooledViT.convert_weights({"trunk.pos_embed": pos}, conch.to_empty(device="cpu"))
    grid = pos[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=(28.1 / 14, 28.1 / 14), mode="bicubic")
    torch.testing.assert_close(loaded["trunk.pos_embed"][:, 1:], want.permute(0, 2, 3, 1).reshape(1, -1, 8))
    torch.testing.assert_close(loaded["trunk.pos_embed"][:, :1], pos[:, :1])


def test_run_refuses_a_wrong_weights_file_before_any_slide_is_read(tmp_path: Path, capsys) -> None:
    from slidestream.cli import main

    wrong = tmp_path / "vit_small.safetensors"  # a file for another network
    save_file(
        {k: v.contiguous() for k, v in _seeded(_small("uni"), 0).weights_module.state_dict().items()}, wrong
    )
    out = tmp_path / "out"
    args = ["run", "--slides", str(tmp_path), "--out", str(out), "--encoder", "uni", "--weights", str(wrong)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "encoder 'uni': weights file" in err and "missing keys: blocks.2." in err
    assert "shape mismatches (file vs model): cls_token (1, 1, 96) vs (1, 1, 1024)" in err
    assert not out.exists()


def test_a_fine_tuned_preset_saved_whole_loads_back(tmp_path: Path) -> None:
    """ICMIL saves its fine-tuned student as the TileEncoder's state dict (`model.vit.…` keys)."""
    from slidestream.pipelines.encoders import TileEncoder

    preset = _small("hibou-b")
    student = TileEncoder(_seeded(preset, 1), encoder_info("hibou-b", "random"))
    path = tmp_path / "encoder.pt"
    torch.save(student.state_dict(), path)
    assert next(iter(torch.load(path))).startswith("model.vit.")
    loaded = _seeded(preset, 2)
    load_weights(loaded.weights_module, str(path), "hibou-b", convert=loaded.convert_weights)
    torch.testing.assert_close(_features(loaded, 224), _features(student.model, 224))
