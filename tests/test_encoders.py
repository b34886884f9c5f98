"""Frozen tile encoders: dims, weights loading (torch / safetensors / prefixes), keys, preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from slidestream.pipelines.encoders import (
    ENCODER_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderError,
    EncoderInfo,
    TileEncoder,
    build_encoder,
    encoder_info,
)

TINY_TIMM = "timm:test_vit"  # ~0.3 M parameters, 160 px, 64-d


def _tiles(n: int, px: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, px, px, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tv_resnet18() -> torchvision.models.ResNet:
    """A random torchvision ResNet-18 with non-trivial batch-norm statistics (so buffers must load too)."""
    torch.manual_seed(123)
    model = torchvision.models.resnet18()
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
    return model.eval()


def _manual_layer3(model: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer3(model.layer2(model.layer1(x)))
    return torch.flatten(model.avgpool(x), 1)


# ------------------------------------------------------------------------------------------- dims


@pytest.mark.parametrize(("name", "dim"), [("resnet50_trunc", 1024), ("resnet18_trunc", 256)])
def test_resnet_dims(name: str, dim: int) -> None:
    assert name in ENCODER_NAMES
    enc = build_encoder(name, "random")
    assert isinstance(enc, TileEncoder)
    assert enc.info.dim == dim and enc.info.input_px == 224
    assert enc.info.mean == IMAGENET_MEAN and enc.info.std == IMAGENET_STD
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert not hasattr(enc.model, "layer4") and not hasattr(enc.model, "fc")
    with torch.inference_mode():
        feats = enc(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, dim) and feats.dtype == torch.float32
    assert encoder_info(name, "random") == enc.info


def test_timm_encoder_dims_and_resize() -> None:
    enc = build_encoder(TINY_TIMM, "random")
    info = enc.info
    assert info.dim == enc.model.num_features == 64
    assert info.input_px == 160 and info.mean == (0.5, 0.5, 0.5)
    assert info.key == "timm_test_vit-random-seed0"
    assert encoder_info(TINY_TIMM, "random") == info  # built on the meta device, same answer
    feats = enc.embed(_tiles(3, 64), batch_size=2)  # 64 px → resized to 160 px
    assert feats.shape == (3, 64) and feats.dtype == np.float32 and np.isfinite(feats).all()


def test_timm_weights_round_trip(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(5)
    src = timm.create_model("test_vit", pretrained=False).eval()  # with its classifier head
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    enc = build_encoder(TINY_TIMM, path)
    x = torch.randn(2, 3, 160, 160)
    with torch.inference_mode():
        want = src.forward_head(src.forward_features(x), pre_logits=True)
        np.testing.assert_allclose(enc(x).numpy(), want.numpy(), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- errors


def test_weights_none_requires_explicit_random() -> None:
    with pytest.raises(EncoderError, match="random"):
        build_encoder("resnet18_trunc", None)
    with pytest.raises(EncoderError, match="random"):
        encoder_info("resnet18_trunc", None)


def test_missing_file_and_unknown_names(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(EncoderError, match=r"nope\.pt"):
        build_encoder("resnet18_trunc", missing)
    with pytest.raises(EncoderError, match="unknown encoder"):
        encoder_info("resnet34_trunc", "random")
    with pytest.raises(EncoderError, match="no_such_model"):
        encoder_info("timm:no_such_model", "random")


def test_unreadable_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderError, match=r"garbage\.pt"):
        build_encoder("resnet18_trunc", bad)


# ------------------------------------------------------------------------------- weights round trip


def test_round_trip_torch_and_safetensors(tmp_path: Path, tv_resnet18: torchvision.models.ResNet) -> None:
    sd = tv_resnet18.state_dict()
    pt, st = tmp_path / "r18.pt", tmp_path / "r18.safetensors"
    torch.save(sd, pt)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        want = _manual_layer3(tv_resnet18, x).numpy()
        for path in (pt, st):
            enc = build_encoder("resnet18_trunc", path)
            assert enc.info.weights == str(path)
            np.testing.assert_allclose(enc(x).numpy(), want, atol=1e-5, rtol=1e-5)
    # keys follow the bytes of the file: the two formats differ
    assert encoder_info("resnet18_trunc", pt).key != encoder_info("resnet18_trunc", st).key
    # embed = preprocess + forward, on the resize path (96 px → 224 px)
    tiles = _tiles(2, 96)
    with torch.inference_mode():
        want = _manual_layer3(tv_resnet18, enc.preprocess(tiles)).numpy()
    np.testing.assert_allclose(enc.embed(tiles), want, atol=1e-5, rtol=1e-5)


def test_prefixed_and_wrapped_state_dicts(tmp_path: Path, tv_resnet18: torchvision.models.ResNet) -> None:
    sd = tv_resnet18.state_dict()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = _manual_layer3(tv_resnet18, x).numpy()
    variants = {
        "module.pt": {f"module.{k}": v for k, v in sd.items()},
        "wrapped.pth": {"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}, "epoch": 3},
        "model.bin": {"model": {f"model.{k}": v for k, v in sd.items()}},
    }
    for file_name, obj in variants.items():
        path = tmp_path / file_name
        torch.save(obj, path)
        with torch.inference_mode():
            got = build_encoder("resnet18_trunc", path)(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=file_name)


def test_missing_and_mismatched_keys(tmp_path: Path, tv_resnet18: torchvision.models.ResNet) -> None:
    sd = tv_resnet18.state_dict()
    no_layer3 = tmp_path / "no_layer3.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer3.")}, no_layer3)
    with pytest.raises(EncoderError, match=r"no_layer3\.pt") as err:
        build_encoder("resnet18_trunc", no_layer3)
    assert "missing keys" in str(err.value) and "layer3.0.conv1.weight" in str(err.value)
    assert "layer4" not in str(err.value)

    no_layer4 = tmp_path / "no_layer4.pt"  # layer4 / fc are not needed by the truncated model
    torch.save({k: v for k, v in sd.items() if not k.startswith(("layer4.", "fc."))}, no_layer4)
    build_encoder("resnet18_trunc", no_layer4)

    wrong = dict(sd)
    wrong["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    wrong_path = tmp_path / "wrong_shape.pt"
    torch.save(wrong, wrong_path)
    with pytest.raises(EncoderError, match=r"conv1\.weight \(32, 3, 7, 7\) vs \(64, 3, 7, 7\)"):
        build_encoder("resnet18_trunc", wrong_path)


# ------------------------------------------------------------------------------------------- keys


def test_keys(tmp_path: Path, tv_resnet18: torchvision.models.ResNet) -> None:
    sd = tv_resnet18.state_dict()
    a, a_copy, b = tmp_path / "a.pt", tmp_path / "a_copy.pt", tmp_path / "b.pt"
    torch.save(sd, a)
    a_copy.write_bytes(a.read_bytes())
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, b)
    key_a = encoder_info("resnet18_trunc", a).key
    assert key_a.startswith("resnet18_trunc-") and len(key_a) == len("resnet18_trunc-") + 10
    assert encoder_info("resnet18_trunc", a_copy).key == key_a
    assert encoder_info("resnet18_trunc", b).key != key_a
    assert encoder_info("resnet50_trunc", a).key != key_a  # same file, another encoder

    r0, r0_again, r1 = (build_encoder("resnet18_trunc", "random", seed=s) for s in (0, 0, 1))
    assert "random" in r0.info.key and r0.info.weights == "random"
    assert r0.info.key == r0_again.info.key == "resnet18_trunc-random-seed0"
    assert r1.info.key != r0.info.key
    assert torch.equal(r0.model.conv1.weight, r0_again.model.conv1.weight)
    assert not torch.equal(r0.model.conv1.weight, r1.model.conv1.weight)
    assert isinstance(r0.info, EncoderInfo)


def test_seeding_leaves_global_rng_alone() -> None:
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    build_encoder("resnet18_trunc", "random", seed=4)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------------ preprocessing


def test_preprocess_resize_and_normalisation() -> None:
    enc = build_encoder("resnet18_trunc", "random")
    x = enc.preprocess(_tiles(2, 256))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert enc.preprocess(torch.from_numpy(_tiles(1, 224))).shape == (1, 3, 224, 224)  # no-resize path
    assert enc.preprocess(_tiles(1, 100)[0]).shape == (1, 3, 224, 224)  # one (H, W, 3) tile

    const = np.empty((2, 256, 256, 3), dtype=np.uint8)
    const[...] = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    z = enc.preprocess(const)
    assert z.abs().max().item() < 0.01  # rounding to uint8 moves at most 0.5/255/std

    one = np.full((1, 224, 224, 3), 255, dtype=np.uint8)
    want = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(enc.preprocess(one)[0, :, 0, 0].numpy(), want, rtol=1e-6)

    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(np.zeros((1, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="RGB"):
        enc.preprocess(np.zeros((1, 32, 32, 4), dtype=np.uint8))


def test_embed_dtype_determinism_batching() -> None:
    enc = build_encoder("resnet18_trunc", "random", seed=3)
    enc.train()  # frozen: stays in eval mode
    assert not enc.training and not enc.model.training
    tiles = _tiles(4, 64, seed=1)
    first = enc.embed(tiles, batch_size=4)
    assert first.shape == (4, 256) and first.dtype == np.float32
    np.testing.assert_array_equal(enc.embed(tiles, batch_size=4), first)
    np.testing.assert_allclose(enc.embed(tiles, batch_size=3), first, atol=1e-5, rtol=1e-4)
    assert enc.embed(tiles[:0]).shape == (0, 256)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_embed_cuda_matches_cpu() -> None:
    enc = build_encoder("resnet50_trunc", "random")
    tiles = _tiles(8, 224)
    cpu = enc.embed(tiles, device="cpu")
    gpu = enc.embed(tiles, device="cuda", batch_size=4)
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    cos = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cos.min() > 0.99  # bf16 autocast


def test_resize_on_the_encoders_device_matches_the_feeding_tasks_resize() -> None:
    """A GPU actor is fed tiles at tile size and resizes them itself (`EmbedStage.feed_px`); its features
    must agree with those of tiles resized by the CPU feeding path (`resize_tile`, PIL)."""
    from pipelines.reader import resize_tile

    rng = np.random.default_rng(3)
    coarse = rng.integers(0, 256, size=(6, 16, 16, 3), dtype=np.uint8)  # smooth, tissue-like tiles
    tiles = np.stack([resize_tile(c, 256) for c in coarse])
    encoder = build_encoder("resnet18_trunc", "random", seed=0)
    on_device = encoder.embed(tiles, batch_size=3)
    on_cpu = encoder.embed(np.stack([resize_tile(t, encoder.info.input_px) for t in tiles]), batch_size=3)
    cosine = (on_device * on_cpu).sum(1) / np.linalg.norm(on_device, axis=1) / np.linalg.norm(on_cpu, axis=1)
    assert cosine.min() > 0.995, cosine
    assert not np.allclose(on_device, on_cpu)  # two resizes, not the same code path twice
