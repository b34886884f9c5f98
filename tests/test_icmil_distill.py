"""ICMIL step 2 without Ray: the three KL terms, the teacher left untouched by training, the student's
augmented view, confidence weights, and the max-pooling bag classifier."""

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
)
from slidestream.trainers.icmil.finetune import Views
from slidestream.trainers.models import build_model

INPUT_PX = 32


@pytest.fixture(scope="module")
def encoder() -> TileEncoder:
    built = build_encoder("resnet18_trunc", "random", 0)
    built.info = with_input_px(built.info, INPUT_PX)
    return built


def _teacher(encoder: TileEncoder, model: str = "abmil") -> InstanceTeacher:
    torch.manual_seed(0)
    mil = build_model(model, encoder.info.dim, 2)
    return InstanceTeacher.from_mil(copy.deepcopy(encoder), mil, model)


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
    a = torch.tensor([0.1, 0.2, 0.3, 0.5])
    w = confidence_weights(a, 2.0)
    # min-max normalised: 0, 0.25, 0.5, 1 → |2a − 1|² = 1, 0.25, 0, 1
    torch.testing.assert_close(w, torch.tensor([1.0, 0.25, 0.0, 1.0]))
    torch.testing.assert_close(confidence_weights(torch.full((3,), 0.3), 6.0), torch.ones(3))


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
