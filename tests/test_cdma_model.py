"""CDMA: the spec's golden loss values, MTNet's blocks and decoders, frozen or trainable encoder BN, decoder 1
at inference."""

from __future__ import annotations

import pytest
import torch

from slidestream.pipelines.encoders import EncoderError
from slidestream.trainers.cdma.losses import (
    CDMALoss,
    cross_decoder_distillation,
    dice_loss,
    distillation,
    mean_entropy,
)
from slidestream.trainers.models.mtnet import (
    ASPP,
    CBAM,
    ChannelAttention,
    Decoder,
    FrozenBatchNorm2d,
    MTNet,
    MTNetSpec,
    SpatialAttention,
    build_mtnet,
    encoder_batchnorm,
)


@pytest.fixture(scope="module")
def golden() -> tuple[list[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    logits = [torch.randn(4, 2, 8, 8, dtype=torch.float64) * 3 for _ in range(3)]
    target = (torch.rand(4, 1, 8, 8) > 0.6).double()[:, 0].long()
    return logits, target


def test_golden_losses(golden: tuple[list[torch.Tensor], torch.Tensor]) -> None:
    (o1, o2, o3), target = golden
    assert distillation(o1, o2, 10.0).item() == pytest.approx(4.221870730467, abs=1e-9)
    assert mean_entropy([o1, o2, o3]).item() == pytest.approx(0.838542647945, abs=1e-9)
    assert cross_decoder_distillation([o1, o2, o3], 10.0).item() == pytest.approx(8.163329903208, abs=1e-9)
    loss = CDMALoss(kd_weight=0.1, entropy_weight=0.1, start_epoch=15)
    before, parts = loss([o1, o2, o3], target, n_labelled=2, epoch=14)
    after, _ = loss([o1, o2, o3], target, n_labelled=2, epoch=15)
    assert parts["sup"] == pytest.approx(1.109575564843, abs=1e-9)
    assert before.item() == pytest.approx(1.109575564843, abs=1e-9)
    assert after.item() == pytest.approx(2.009762819958, abs=1e-9)
    assert dice_loss(torch.softmax(o1, 1), target, [1]).item() == pytest.approx(0.460779247238, abs=1e-9)
    supervised_only = CDMALoss(semi_supervised=False)
    assert supervised_only([o1, o2, o3], target, 2, 100)[0].item() == pytest.approx(1.109575564843, abs=1e-9)


def test_distillation_teacher_gets_no_gradient(golden: tuple[list[torch.Tensor], torch.Tensor]) -> None:
    (o1, o2, _), _ = golden
    student, teacher = o1.clone().requires_grad_(), o2.clone().requires_grad_()
    distillation(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("channels", [304, 256])
def test_attention_blocks_keep_shape(channels: int) -> None:
    x = torch.randn(2, channels, 5, 7)
    for block in (ChannelAttention(channels, 16), SpatialAttention(), CBAM(channels, 16)):
        assert block(x).shape == x.shape
    assert ChannelAttention(channels, 16).mlp[0].out_channels == channels // 16
    conv = SpatialAttention().conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (2, 1, (7, 7), None)


def test_official_head_shapes() -> None:
    spec = MTNetSpec.official()
    aspp = ASPP(2048, 256, spec.dilations)
    high = aspp.eval()(torch.randn(1, 2048, 4, 4))
    assert high.shape == (1, 256, 4, 4)
    for attention in MTNet.ATTENTIONS:
        decoder = Decoder(attention, 256, spec, 3).eval()
        out = decoder(high, torch.randn(1, 256, 16, 16), (64, 64))
        assert out.shape == (1, 3, 64, 64)
        assert decoder.conv1[0].in_channels == 304 and decoder.conv1[0].out_channels == 256


def test_official_network_forward() -> None:
    model = MTNet(2, MTNetSpec.official())
    low_ch, high_ch = model.encoder.feature_info.channels()
    assert (low_ch, high_ch) == (256, 2048)
    low, high = model.encoder(torch.randn(1, 3, 64, 64))
    assert low.shape == (1, 256, 16, 16) and high.shape == (1, 2048, 4, 4)  # strides 4 and 16
    # output stride 16 as the official network: layer4 at stride 1 and undilated (not timm's dilation 2)
    convs = [m for m in model.encoder.layer4.modules() if isinstance(m, torch.nn.Conv2d)]
    three = [c for c in convs if c.kernel_size == (3, 3)]
    assert len(three) == 3 and all(c.dilation == (1, 1) and c.padding == (1, 1) for c in three)
    assert all(c.stride == (1, 1) for c in convs)
    model.train()
    outs = model(torch.randn(2, 3, 64, 64))
    assert len(outs) == 3 and all(o.shape == (2, 2, 64, 64) for o in outs)


def test_encoder_batchnorm_is_frozen_but_affine_trains() -> None:
    torch.manual_seed(0)
    model = build_mtnet(2, "light", encoder_bn="frozen")
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k}
    weight_before = norms[0].weight.detach().clone()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    outs = model(torch.randn(2, 3, 64, 64) * 3 + 1)
    sum(o.square().mean() for o in outs).backward()
    optimizer.step()
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(norms[0].weight.detach(), weight_before)


def test_encoder_batchnorm_follows_the_weights(tmp_path) -> None:
    """`cdma.encoder_bn: auto` freezes an ImageNet encoder's BatchNorm (official) and trains a random
    encoder's (frozen initial statistics would be no normalisation); frozen / train force either kind."""
    import timm

    from slidestream.cluster.config import CDMAConfig
    from slidestream.trainers.cdma.run import encoder_bn

    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pt")
    assert CDMAConfig().encoder_bn == "auto"
    for setting, weights, kind in [
        ("auto", str(tmp_path / "r18.pt"), "frozen"),
        ("auto", "random", "train"),
        ("frozen", "random", "frozen"),
        ("train", str(tmp_path / "r18.pt"), "train"),
    ]:
        cfg = CDMAConfig(network="light", weights=weights, encoder_bn=setting)
        assert encoder_bn(cfg) == kind, (setting, weights)
    with pytest.raises(ValueError, match="encoder_bn"):
        encoder_batchnorm("sync", pretrained=True)

    def norms(model: MTNet) -> list[torch.nn.BatchNorm2d]:
        return [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    pretrained = build_mtnet(2, "light", tmp_path / "r18.pt")
    assert norms(pretrained) and all(isinstance(m, FrozenBatchNorm2d) for m in norms(pretrained))
    random = build_mtnet(2, "light")
    assert norms(random) and not any(isinstance(m, FrozenBatchNorm2d) for m in norms(random))
    assert set(random.state_dict()) == set(pretrained.state_dict())  # the same checkpoint either way
    random.train()
    random(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert not torch.equal(norms(random)[0].running_mean, torch.zeros_like(norms(random)[0].running_mean))


@pytest.mark.parametrize("kind", ["frozen", "train"])
def test_unlabelled_tiles_change_the_labelled_outputs_only_through_trained_batchnorm(kind: str) -> None:
    """Why the training loop leaves the unlabelled half out before the unsupervised terms start when the
    encoder's BatchNorm is frozen: every other layer works per image, so the labelled images' training
    outputs are the same with or without unlabelled images in the batch (dropout held still to compare)."""
    torch.manual_seed(0)
    model = build_mtnet(2, "light", encoder_bn=kind).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    labelled, unlabelled = torch.randn(3, 3, 64, 64), torch.randn(5, 3, 64, 64) * 2 + 1
    with torch.no_grad():
        alone = model(labelled)
        batched = model(torch.cat([labelled, unlabelled]))
    same = all(torch.allclose(a, b[:3], atol=1e-5) for a, b in zip(alone, batched, strict=True))
    assert same == (kind == "frozen") == (not model.mixes_images())
    assert CDMALoss(start_epoch=5).uses_unlabelled(5) and not CDMALoss(start_epoch=5).uses_unlabelled(4)
    assert not CDMALoss(start_epoch=5, semi_supervised=False).uses_unlabelled(9)


def test_inference_returns_decoder_one() -> None:
    torch.manual_seed(0)
    model = build_mtnet(3, "light").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        low, high = model.encoder(x)
        first = model.decoders[0](model.aspp(high), low, (64, 64))
        second = model.decoders[1](model.aspp(high), low, (64, 64))
    assert out.shape == (2, 3, 64, 64)
    assert torch.equal(out, first) and not torch.allclose(out, second)


def test_parameter_groups_cover_every_parameter() -> None:
    model = build_mtnet(2, "light")
    groups = model.parameter_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    encoder = {id(p) for p in model.encoder.parameters()}
    assert all(id(p) in encoder for p in groups["pretrained_weight"] + groups["pretrained_bias"])
    assert groups["new_bias"] and groups["pretrained_bias"]


def test_encoder_weights_from_a_local_file(tmp_path) -> None:
    import timm

    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    model = build_mtnet(2, "light", tmp_path / "r18.pt")
    key = "layer1.0.conv1.weight"
    assert torch.equal(model.encoder.state_dict()[key], source.state_dict()[key])
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(EncoderError, match=r"bad\.pt"):
        build_mtnet(2, "light", tmp_path / "bad.pt")
