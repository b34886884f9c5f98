"""The preset encoders: each builds as its card documents it, the CPU-sized ones embed tiles at their
dim, their transform is the documented one, commands take their tiling (and refuse another scale), and
`slidestream encoders` lists them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slidestream.cli import main
from slidestream.cluster.config import ConfigError, load_config
from slidestream.pipelines.encoder_presets import PRESETS, build_preset
from slidestream.pipelines.encoder_tiling import encoder_tiling
from slidestream.pipelines.encoders import ENCODER_NAMES, TileEncoder, build_encoder, encoder_info

# ViT-L and smaller: built for real and run on CPU; the giants (ViT-H, ViT-g) only on the meta device.
CPU_SIZED = [name for name in PRESETS if PRESETS[name].width <= 1024]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_as_documented(name: str) -> None:
    preset = PRESETS[name]
    assert name in ENCODER_NAMES
    with torch.device("meta"):
        network = build_preset(preset)
        features = network(torch.empty(2, 3, preset.input_px, preset.input_px))
    vit = network.backbone
    assert len(vit.blocks) == preset.blocks
    assert vit.embed_dim == preset.width
    assert vit.patch_embed.patch_size == (preset.patch, preset.patch)
    assert vit.num_reg_tokens == preset.registers
    assert vit.num_prefix_tokens == 1 + preset.registers
    assert tuple(features.shape) == (2, preset.dim)
    if preset.kwargs.get("mlp_layer"):  # SwiGLU needs SiLU passed explicitly, or timm's Block makes it GELU
        assert isinstance(vit.blocks[0].mlp.act, torch.nn.SiLU)
    info = encoder_info(name, "random")
    assert (info.dim, info.input_px, info.mean, info.std) == (
        preset.dim,
        preset.input_px,
        preset.mean,
        preset.std,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", CPU_SIZED)
def test_cpu_sized_preset_embeds_two_tiles(name: str) -> None:
    preset = PRESETS[name]
    encoder = build_encoder(name, "random", seed=1)
    tiles = np.random.default_rng(0).integers(0, 256, (2, preset.tile_px, preset.tile_px, 3), dtype=np.uint8)
    features = encoder.embed(tiles, batch_size=2)
    assert features.shape == (2, preset.dim) and np.isfinite(features).all()
    assert not np.allclose(features[0], features[1])


def test_transform_is_the_documented_resize_crop_and_normalisation() -> None:
    tile = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    gigapath = encoder_info("prov-gigapath", "random")  # 256 px → CenterCrop(224), ImageNet mean/std
    encoder = TileEncoder(torch.nn.Identity(), gigapath)  # only the transform is under test
    x = tile[16:240, 16:240].astype(np.float64) / 255.0
    want = (x - np.array(gigapath.mean)) / np.array(gigapath.std)
    got = encoder.preprocess(tile)[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)

    hoptimus = encoder_info("h-optimus-0", "random")  # 224 px in, no resize; Bioptimus' mean/std
    encoder = TileEncoder(torch.nn.Identity(), hoptimus)
    small = tile[:224, :224]
    want = (small / 255.0 - np.array(hoptimus.mean)) / np.array(hoptimus.std)
    got = encoder.preprocess(small)[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_commands_take_the_preset_tiling_and_refuse_another_scale() -> None:
    assert encoder_tiling(load_config(None, []), "uni").tiling.key == "mpp0.50_px256"
    assert encoder_tiling(load_config(None, []), "virchow2").tiling.key == "mpp0.50_px224"
    same_scale = load_config(None, ["tiling.mpp=0.25", "tiling.tile_px=448"])  # 40x, the same 112 µm
    assert encoder_tiling(same_scale, "virchow2").tiling.key == "mpp0.25_px448"
    assert encoder_tiling(load_config(None, []), "resnet50_trunc").tiling.key == "mpp0.50_px256"

    with pytest.raises(ConfigError, match=r"'virchow2' embeds 224-px tiles at 0.5 µm/px .*tiling.mpp=1.0"):
        encoder_tiling(load_config(None, ["tiling.mpp=1.0"]), "virchow2")
    with pytest.raises(ConfigError, match=r"embed.input_px=64 would change its scale"):
        encoder_tiling(load_config(None, ["embed.input_px=64"]), "uni")


def test_run_refuses_a_tiling_the_preset_cannot_take_before_any_work(tmp_path, capsys) -> None:
    code = main(
        [
            "run",
            "--slides",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--encoder",
            "uni",
            "--weights",
            "random",
            "--set",
            "tiling.tile_px=512",
        ]
    )
    assert code == 2
    assert "'uni' embeds 256-px tiles at 0.5 µm/px" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_encoders_command_lists_every_preset(capsys) -> None:
    assert main(["encoders", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["presets"]}
    assert set(rows) == set(PRESETS)
    assert rows["uni"]["dim"] == 1024 and rows["uni"]["params_m"] == 303
    assert rows["virchow2"]["dim"] == 2560 and rows["h-optimus-0"]["params_m"] == 1135
    assert main(["encoders"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in PRESETS) and "CC-BY-NC-ND-4.0" in table
