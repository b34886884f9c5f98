"""ICMIL step 2 without Ray: the three KL terms, the teacher's head per backbone, the teacher left untouched
by training, the student's augmented view, the journal version's confidence weights and learning-rate
steps, and the bag classifiers' ICMIL options (bias-free reduction, max-pooling)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slidestream.pipelines.embed import with_input_px
from slidestream.pipelines.encoders import TileEncoder, build_encoder
from slidestream.trainers.icmil.distill import (
    InstanceTeacher,
    augmented_view,
    check_model,
    confidence_weights,
    distill_losses,
    make_student,
    minmax,
)
from slidestream.trainers.icmil.finetune import Views, epoch_lr, interleave, lr_milestones
from slidestream.trainers.models import build_model
from slidestream.trainers.models.clam import GatedAttention

INPUT_PX = 32


@pytest.fixture(scope="module")
def encoder() -> TileEncoder:
    built = build_encoder("resnet18_trunc", "random", 0)
    built.info = with_input_px(built.info, INPUT_PX)
    return built


def _teacher(
    encoder: TileEncoder, model: str = "abmil", confidence: bool = False, **options: object
) -> InstanceTeacher:
    torch.manual_seed(0)
    mil = build_model(model, encoder.info.dim, 2, **options)
    with torch.no_grad():  # distinct, non-zero biases: a mixed-up head or a dropped bias shows
        for name, p in mil.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()))
    return InstanceTeacher.from_mil(copy.deepcopy(encoder), mil, model, confidence=confidence)


def _linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x·Wᵀ + b written out, so expectations do not run the modules under test."""
    return x @ layer.weight.t() + (layer.bias if layer.bias is not None else 0)


def _gated_raw(att: GatedAttention | torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """w · (tanh(V h) ⊙ sigmoid(U h)) by hand: the raw (pre-softmax) gated attention score per tile."""
    return _linear(att.attn_out, torch.tanh(_linear(att.attn_v, h)) * torch.sigmoid(_linear(att.attn_u, h)))[
        :, 0
    ]


def _by_hand_minmax(x: torch.Tensor) -> torch.Tensor:
    return (x - x.min()) / (x.max() - x.min())


def _tiles(n: int = 8, px: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, px, px, 3), dtype=np.uint8)


def _views(teacher: InstanceTeacher, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    views = Views(teacher.encoder, 0.5, torch.device("cpu"))
    return views(_tiles(seed=seed), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model", ["abmil", "maxpool", "dtfd"])
def test_consistency_terms_are_zero_at_initialisation(encoder, model):
    teacher = _teacher(encoder, model)
    student = make_student(teacher)
    clean, aug = _views(teacher)
    losses = distill_losses(teacher, student, clean, aug)
    assert float(losses["loss_w1"].detach()) == 0.0
    assert float(losses["loss_w2"].detach()) == 0.0
    # The augmented view gives the student other probabilities: loss_c is what drives training.
    assert float(losses["loss_c"].detach()) > 0.0
    assert torch.allclose(losses["loss"], losses["loss_c"])


def test_kl_terms_follow_the_spec_definitions(encoder):
    """The three terms against a hand computation: element-wise means of p·(log p − log q)."""
    teacher = _teacher(encoder)
    student = make_student(teacher)
    with torch.no_grad():  # move the student away from the teacher so every term is non-zero
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    clean, aug = _views(teacher, seed=1)
    losses = distill_losses(teacher, student, clean, aug, w1=0.5, w2=0.5)
    with torch.no_grad():
        f_t = teacher.encoder(clean)
        m_t = teacher.reduction(f_t)
        p_t = torch.softmax(teacher.head(m_t), -1)
        q_aug = torch.softmax(student.head(student.reduction(student.encoder(aug))), -1)
        q_clean = torch.softmax(student.head(student.reduction(f_t)), -1)
        r_t, r_s = torch.softmax(m_t, -1), torch.softmax(student.reduction(f_t), -1)
    expect_c = (p_t * (p_t.log() - q_aug.log())).mean()
    expect_w1 = (p_t * (p_t.log() - q_clean.log())).mean()
    expect_w2 = torch.special.xlogy(r_t, r_t).sub(r_t * r_s.log()).mean()
    torch.testing.assert_close(losses["loss_c"], expect_c, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses["loss_w1"], expect_w1, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses["loss_w2"], expect_w2, rtol=1e-4, atol=1e-7)
    assert float(losses["loss_w1"].detach()) > 0 and float(losses["loss_w2"].detach()) > 0
    total = expect_c + 0.5 * expect_w1 + 0.5 * expect_w2
    torch.testing.assert_close(losses["loss"], total, rtol=1e-4, atol=1e-7)


def test_training_steps_change_the_student_and_never_the_teacher(encoder):
    teacher = _teacher(encoder)
    before = {
        "encoder": copy.deepcopy(teacher.encoder.state_dict()),
        "mil": copy.deepcopy(teacher.mil.state_dict()),
    }
    student = make_student(teacher)
    start = copy.deepcopy(student.encoder.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for step in range(3):
        clean, aug = _views(teacher, seed=step)
        losses = distill_losses(teacher, student, clean, aug, beta=6.0)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    for name, state in (("encoder", teacher.encoder.state_dict()), ("mil", teacher.mil.state_dict())):
        for key, value in state.items():
            assert torch.equal(value, before[name][key]), f"teacher {name} {key} changed"
    assert not any(p.requires_grad for p in [*teacher.encoder.parameters(), *teacher.mil.parameters()])
    changed = [k for k, v in student.encoder.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.endswith("weight") for k in changed)
    assert any(k.endswith("running_mean") for k in changed)  # the student's BatchNorm trains
    assert not student.reduction.training  # its reduction layer has no dropout


def test_augmented_view_is_a_crop_flip_of_the_tile():
    x = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    a = augmented_view(x, 24, 0.5, torch.Generator().manual_seed(1))
    b = augmented_view(x, 24, 0.5, torch.Generator().manual_seed(1))
    assert a.shape == (6, 3, 24, 24) and torch.equal(a, b)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # With the full-area scale and a flat tile, the view is the tile's (constant) colour.
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(
        augmented_view(flat, 8, 1.0, torch.Generator()), torch.full((1, 3, 8, 8), 0.25)
    )
    # Views of one tile differ between draws.
    c = augmented_view(x, 24, 0.5, torch.Generator().manual_seed(2))
    assert not torch.equal(a, c)


def test_confidence_weights():
    a = minmax(torch.tensor([0.1, 0.2, 0.3, 0.5]))
    torch.testing.assert_close(a, torch.tensor([0.0, 0.25, 0.5, 1.0]))
    # |2a − 1|² = 1, 0.25, 0, 1
    torch.testing.assert_close(confidence_weights(a, 2.0), torch.tensor([1.0, 0.25, 0.0, 1.0]))
    # A flat batch: every tile weighs 1 (the official code would divide by zero).
    torch.testing.assert_close(confidence_weights(minmax(torch.full((3,), 0.3)), 6.0), torch.ones(3))


def test_dtfd_teacher_scores_tiles_with_the_tier2_head(encoder):
    """The official step-2 script: tier-2 bag head (att_classifier.classifier.fc) on each tile's tier-1
    reduction output; the tier-1 pseudo-bag classifier is not the teacher (it was, before)."""
    teacher = _teacher(encoder, "dtfd")
    mil = teacher.mil
    f = torch.randn(5, encoder.info.dim, generator=torch.Generator().manual_seed(3))
    m = torch.relu(_linear(mil.embed[0], f))
    tier2, tier1 = _linear(mil.head, m), _linear(mil.classifier1, m)
    assert not torch.allclose(tier2, tier1, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(teacher.head(teacher.reduction(f)), tier2)
        torch.testing.assert_close(teacher.logits(teacher.reduction(f)), tier2)
        torch.testing.assert_close(make_student(teacher).head(m), tier2)


def test_dtfd_dual_confidence_mixes_both_tiers(encoder):
    """Journal version, DTFD-MIL: a = minmax(softmax tier-2 attention) · minmax(softmax tier-1 attention)
    over the batch, teacher logits 0.7 · tier-2 head + 0.3 · tier-1 head."""
    teacher = _teacher(encoder, "dtfd", confidence=True)
    mil = teacher.mil
    m = torch.relu(torch.randn(6, 512, generator=torch.Generator().manual_seed(4)))
    a2 = _by_hand_minmax(torch.softmax(_gated_raw(mil.attention2, m), dim=0))
    a1 = _by_hand_minmax(torch.softmax(_gated_raw(mil.attention1, m), dim=0))
    with torch.no_grad():
        torch.testing.assert_close(teacher.confidence(m), a2 * a1)
        mixed = 0.7 * _linear(mil.head, m) + 0.3 * _linear(mil.classifier1, m)
        torch.testing.assert_close(teacher.logits(m), mixed)
    # Without confidence weights the teacher is the tier-2 head alone.
    torch.testing.assert_close(_teacher(encoder, "dtfd").logits(m), _linear(mil.head, m))


def test_abmil_confidence_uses_the_raw_gated_attention(encoder):
    """Journal version, ABMIL: a = min-max of the RAW gated attention score (isNorm=False), not of the
    softmaxed attention (which min-maxes to other values: exp is not affine)."""
    teacher = _teacher(encoder, "abmil", confidence=True, gated=True)
    m = torch.relu(torch.randn(6, 512, generator=torch.Generator().manual_seed(5)))
    raw = _gated_raw(teacher.mil, m)
    with torch.no_grad():
        a = teacher.confidence(m)
    torch.testing.assert_close(a, _by_hand_minmax(raw))
    assert not torch.allclose(a, _by_hand_minmax(torch.softmax(raw, dim=0)), atol=1e-3)
    torch.testing.assert_close(teacher.logits(m), _linear(teacher.mil.head, m))  # no mixing for ABMIL


@pytest.mark.parametrize(("model", "options", "beta"), [("abmil", {"gated": True}, 6.0), ("dtfd", {}, 2.0)])
def test_confidence_weighted_loss_c_by_hand(encoder, model, options, beta):
    """loss_c = mean over tiles × classes of w_i · p_T(log p_T − log q_S), w_i = |2a_i − 1|^β, with the
    journal version's a and teacher logits (hand-computed from the parameters)."""
    teacher = _teacher(encoder, model, confidence=True, **options)
    student = make_student(teacher)
    clean, aug = _views(teacher, seed=2)
    losses = distill_losses(teacher, student, clean, aug, beta=beta)
    mil = teacher.mil
    with torch.no_grad():
        m = torch.relu(_linear(mil.embed[0], teacher.encoder(clean)))
        if model == "abmil":
            a = _by_hand_minmax(_gated_raw(mil, m))
            logits = _linear(mil.head, m)
        else:
            a = _by_hand_minmax(torch.softmax(_gated_raw(mil.attention2, m), 0))
            a = a * _by_hand_minmax(torch.softmax(_gated_raw(mil.attention1, m), 0))
            logits = 0.7 * _linear(mil.head, m) + 0.3 * _linear(mil.classifier1, m)
        p = torch.softmax(logits, -1)
        q = torch.softmax(student.head(student.reduction(student.encoder(aug))), -1)
    w = (2 * a - 1).abs() ** beta
    expect = (w[:, None] * p * (p.log() - q.log())).mean()
    torch.testing.assert_close(losses["loss_c"], expect, rtol=1e-4, atol=1e-8)


def test_fine_tuning_lr_steps_like_the_official_multisteplr():
    """Confidence scripts: MultiStepLR(milestones [100], γ 0.2) stepped once per epoch; none without."""
    on = {"confidence": True, "lr_milestones": None}
    assert lr_milestones(on) == [100]
    assert lr_milestones({"confidence": False, "lr_milestones": None}) == []
    assert lr_milestones({"confidence": False, "lr_milestones": [3, 5]}) == [3, 5]
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [100], gamma=0.2)
    for epoch in range(103):
        assert epoch_lr(1e-5, [100], 0.2, epoch) == pytest.approx(optimizer.param_groups[0]["lr"]), epoch
        optimizer.step()
        scheduler.step()
    assert epoch_lr(1e-5, [100], 0.2, 100) == pytest.approx(2e-6)


def test_abmil_option_drops_the_reduction_bias(encoder):
    """`train.model_options: {embed_bias: false}`: the reduction Linear(D→512) has no bias (ICMIL's
    DimReduction), so a zero feature embeds to exactly zero; the default keeps the bias."""
    torch.manual_seed(0)
    plain = build_model("abmil", 8, 2, gated=True)
    free = build_model("abmil", 8, 2, gated=True, embed_bias=False)
    assert plain.embed[0].bias is not None and free.embed[0].bias is None
    assert "embed.0.bias" not in free.state_dict() and "embed.0.bias" in plain.state_dict()
    with torch.no_grad():
        plain.embed[0].bias.fill_(0.3)
        assert torch.equal(free.eval().embed(torch.zeros(3, 8)), torch.zeros(3, 512))
        assert float(plain.eval().embed(torch.zeros(3, 8)).abs().sum()) > 0
    teacher = _teacher(encoder, "abmil", gated=True, embed_bias=False)
    assert make_student(teacher).reduction[0].bias is None


def test_confidence_needs_attention_and_models_are_checked(encoder):
    teacher = _teacher(encoder, "maxpool")
    clean, aug = _views(teacher)
    with pytest.raises(ValueError, match="attention-based"):
        distill_losses(teacher, make_student(teacher), clean, aug, beta=2.0)
    with pytest.raises(ValueError, match="transmil"):
        check_model("transmil")


def test_maxpool_model_takes_the_max_per_dimension():
    torch.manual_seed(0)
    model = build_model("maxpool", 8, 3).eval()
    x = torch.randn(5, 8)
    out = model(x)
    h = model.embed(x)
    torch.testing.assert_close(out["bag_feature"], h.max(0, keepdim=True).values)
    torch.testing.assert_close(out["logits"], model.head(h.max(0, keepdim=True).values))
    assert out["scores"].shape == (5,) and float(out["scores"].sum()) >= 1.0 - 1e-6
    loss = model.loss(out, torch.tensor([2]))
    torch.testing.assert_close(loss, F.cross_entropy(out["logits"], torch.tensor([2])))


def test_interleave_reads_shards_round_robin_with_few_open():
    """Tiles of `open_shards` shards (one slide each) alternate, so a step's batch mixes slides; a shard
    opens only when an open one ends."""
    opened: list[str] = []

    def shard(name: str, n: int):
        opened.append(name)
        yield from (f"{name}{i}" for i in range(n))

    streams = (shard(name, n) for name, n in (("a", 3), ("b", 1), ("c", 2)))
    out = interleave(streams, 2)
    assert [next(out) for _ in range(3)] == ["a0", "b0", "a1"] and opened == ["a", "b"]
    assert list(out) == ["a2", "c0", "c1"] and opened == ["a", "b", "c"]
    assert list(interleave(iter([iter("xy"), iter("z")]), 1)) == ["x", "y", "z"]
