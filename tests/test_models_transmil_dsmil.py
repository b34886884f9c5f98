"""TransMIL and DSMIL aggregators: shapes, gradients, Nyström attention against exact attention, PPEG
layout, DSMIL loss and forward against hand computations, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from slidestream.trainers.mil.loop import MHIMStep
from slidestream.trainers.mil.mhim import consistency_loss
from slidestream.trainers.models import build_model
from slidestream.trainers.models.dsmil import DSMIL
from slidestream.trainers.models.transmil import PPEG, NystromAttention, TransMIL, pinv_iterative


def _mhim_params(alpha: float) -> dict[str, float | bool]:
    """MHIM settings without masking or schedules: only the consistency term (weight ``alpha``) acts."""
    return {
        "mask_ratio": 0.0,
        "mask_ratio_l": 0.0,
        "mask_ratio_h": 0.0,
        "mask_ratio_hr": 1.0,
        "mask_ratio_h_decay": False,
        "alpha": alpha,
        "tau_s": 1.0,
        "tau_t": 0.1,
        "momentum": 0.9999,
        "momentum_cosine": False,
    }


def _exact_attention(attn: NystromAttention, x: Tensor) -> tuple[Tensor, Tensor]:
    """Exact softmax attention with ``attn``'s weights (same residual conv and output projection), and the
    full attention matrix (B, heads, n, n)."""
    b, n, _ = x.shape
    q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, attn.heads, attn.dim_head).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(attn.dim_head), dim=-1)
    out = (a @ v + attn.res_conv(v)).transpose(1, 2).reshape(b, n, attn.heads * attn.dim_head)
    return attn.to_out(out), a


def _small_attention(landmarks: int, iterations: int = 30) -> NystromAttention:
    torch.manual_seed(0)
    attn = NystromAttention(64, heads=4, dim_head=16, n_landmarks=landmarks, pinv_iterations=iterations)
    return attn.double()


# --- Nyström attention ------------------------------------------------------------------------------------


def test_pinv_iterative_matches_pinv() -> None:
    torch.manual_seed(0)
    a = torch.softmax(2 * torch.randn(3, 16, 16, dtype=torch.double), dim=-1)
    assert torch.allclose(pinv_iterative(a, 30), torch.linalg.pinv(a), atol=1e-8)
    few = pinv_iterative(a, 6)  # the default count: a usable but inexact inverse
    assert (a @ few @ a - a).abs().max() < 0.05


def test_nystrom_exact_when_landmarks_equal_length() -> None:
    attn = _small_attention(landmarks=32).eval()
    x = torch.randn(2, 32, 64, dtype=torch.double)
    out, row = attn(x, query_row=3)
    ref, a = _exact_attention(attn, x)
    assert torch.allclose(out, ref, atol=1e-9)
    assert row is not None and row.shape == (2, 4, 32)
    assert torch.allclose(row, a[:, :, 3], atol=1e-9)


def test_nystrom_default_iterations_close_to_exact() -> None:
    attn = _small_attention(landmarks=32, iterations=6).eval()
    x = torch.randn(1, 32, 64, dtype=torch.double)
    out, _ = attn(x)
    ref, _ = _exact_attention(attn, x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_nystrom_short_sequence_is_exact_over_front_zero_padding() -> None:
    """Fewer tokens than landmarks: zero tokens are put in front and not masked (documented choice), so the
    result is exact attention over that padded sequence, cropped to the real tokens."""
    attn = _small_attention(landmarks=16).eval()
    x = torch.randn(1, 10, 64, dtype=torch.double)
    out, row = attn(x, query_row=0)
    padded = torch.cat([torch.zeros(1, 6, 64, dtype=torch.double), x], dim=1)
    ref, a = _exact_attention(attn, padded)
    assert out.shape == (1, 10, 64)
    assert torch.allclose(out, ref[:, 6:], atol=1e-9)
    assert row is not None and torch.allclose(row, a[:, :, 6, 6:], atol=1e-9)
    assert (row.sum(dim=-1) < 1 - 1e-3).all()  # the padding tokens took part of the mass
    # Without padding (a different result) the comparison would fail: the check is sensitive to it.
    assert not torch.allclose(out, _exact_attention(attn, x)[0], atol=1e-3)


def test_nystrom_exact_on_segment_constant_sequence() -> None:
    """With every landmark segment made of identical tokens, the landmarks are those tokens and the Nyström
    formula is exact even with fewer landmarks than tokens; checks the segment layout (consecutive tokens)."""
    attn = _small_attention(landmarks=12).eval()
    unique = torch.randn(1, 12, 64, dtype=torch.double)
    x = unique.repeat_interleave(4, dim=1)  # 48 tokens, segments of 4 consecutive equal tokens
    out, _ = attn(x)
    ref, _ = _exact_attention(attn, x)
    assert torch.allclose(out, ref, atol=1e-8)
    shuffled = unique.repeat(1, 4, 1)  # same tokens, but segments now mix different tokens
    out_s, _ = attn(shuffled)
    assert not torch.allclose(out_s, _exact_attention(attn, shuffled)[0], atol=1e-4)


# --- PPEG -------------------------------------------------------------------------------------------------


def _ppeg_reference(ppeg: PPEG, x: Tensor) -> Tensor:
    """Grid built cell by cell: row-major, cyclic repetition of the instances, side max(7, ceil(√N))."""
    n, dim = x.shape[1] - 1, x.shape[2]
    side = max(7, math.ceil(math.sqrt(n)))
    grid = torch.empty(1, dim, side, side, dtype=x.dtype)
    for cell in range(side * side):
        grid[0, :, cell // side, cell % side] = x[0, 1 + cell % n]
    grid = grid + ppeg.proj7(grid) + ppeg.proj5(grid) + ppeg.proj3(grid)
    feats = torch.stack([grid[0, :, i // side, i % side] for i in range(n)])
    return torch.cat([x[0, :1], feats]).unsqueeze(0)


@pytest.mark.parametrize("n", [1, 5, 49, 50, 83])
def test_ppeg_shape_and_layout(n: int) -> None:
    torch.manual_seed(n)
    ppeg = PPEG(16).double()
    x = torch.randn(1, 1 + n, 16, dtype=torch.double)
    out = ppeg(x)
    assert out.shape == x.shape
    assert torch.equal(out[:, 0], x[:, 0])  # class token passes through
    assert torch.allclose(out, _ppeg_reference(ppeg, x), atol=1e-10)
    assert not torch.allclose(out[:, 1:], x[:, 1:])  # the convolutions did something


# --- TransMIL ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 49, 300, 1000])
@pytest.mark.parametrize(("d", "c"), [(32, 3), (1024, 2)])
def test_transmil_shapes(n: int, d: int, c: int) -> None:
    torch.manual_seed(0)
    model = TransMIL(d, c).eval()  # default 256 landmarks: every N below 255 is a short sequence
    with torch.no_grad():
        out = model(torch.randn(n, d))
    assert out["logits"].shape == (1, c)
    assert out["bag_feature"].shape == (1, 512)
    assert out["scores"].shape == (8, n)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.allclose(out["logits"], model.head(out["bag_feature"]))
    assert model.probabilities(out).shape == (1, c)


def test_transmil_scores_are_layer0_class_token_attention() -> None:
    """With as many landmarks as tokens (no padding) and a converged pseudo-inverse, the scores equal the
    exact class-token attention row of the first layer over the instances."""
    torch.manual_seed(0)
    model = TransMIL(32, 2, n_landmarks=40, pinv_iterations=30).double().eval()
    x = torch.randn(39, 32, dtype=torch.double)
    out = model(x)
    tokens = torch.cat([model.cls_token, model.embed(x).unsqueeze(0)], dim=1)
    _, a = _exact_attention(model.layer1.attn, model.layer1.norm(tokens))
    assert torch.allclose(out["scores"], a[0, :, 0, 1:], atol=1e-8)


def test_transmil_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = TransMIL(32, 3, n_landmarks=8).train()  # fewer landmarks than tokens: the approximation proper
    out = model(torch.randn(20, 32))
    model.loss(out, torch.tensor([2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_transmil_eval_deterministic_train_stochastic() -> None:
    torch.manual_seed(0)
    model = TransMIL(32, 2, n_landmarks=16)  # few landmarks only to keep the test fast
    x = torch.randn(30, 32)
    model.eval()
    a, b = model(x), model(x.unsqueeze(0))
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["scores"], b["scores"])
    model.train()
    assert not torch.equal(model(x)["logits"], model(x)["logits"])  # dropout is active in train mode


def test_transmil_rejects_batches_and_registry_builds_it() -> None:
    model = build_model("transmil", 16, 2)
    assert isinstance(model, TransMIL) and model.embed.in_dim == 16
    with pytest.raises(ValueError, match="one bag"):
        model(torch.randn(2, 5, 16))


# --- DSMIL ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 49, 300, 1000])
@pytest.mark.parametrize(("d", "c"), [(32, 3), (1024, 2)])
def test_dsmil_shapes(n: int, d: int, c: int) -> None:
    torch.manual_seed(0)
    model = DSMIL(d, c).eval()
    out = model(torch.randn(n, d))
    assert out["logits"].shape == (1, c)
    assert out["instance_logits"].shape == (n, c)
    assert out["bag_feature"].shape == (c, 512)
    assert out["scores"].shape == (n,)
    assert torch.equal(out["scores"], out["instance_logits"].max(dim=1).values)
    assert torch.allclose(out["attention"].sum(dim=0), torch.ones(c))
    probs = model.probabilities(out)
    assert probs.shape == (1, c) and torch.allclose(probs.sum(), torch.tensor(1.0))


def test_dsmil_forward_matches_hand_computation() -> None:
    torch.manual_seed(0)
    model = DSMIL(8, 3).double().eval()
    x = torch.randn(7, 8, dtype=torch.double)
    out = model(x)
    h = model.embed(x)
    inst = model.instance_classifier(h)
    conv_w, conv_b = model.bag_classifier.weight, model.bag_classifier.bias  # (C, C, 512), (C,)
    bag_rows = []
    for cls in range(3):
        crit = max(range(7), key=lambda i, cls=cls: inst[i, cls].item())
        logits = torch.stack([model.q(h[i]) @ model.q(h[crit]) for i in range(7)]) / math.sqrt(128)
        weights = torch.softmax(logits, dim=0)
        bag_rows.append(sum(weights[i] * model.v(h[i]) for i in range(7)))
    bag = torch.stack(bag_rows)  # (C, 512)
    expected = torch.stack([(conv_w[o] * bag).sum() + conv_b[o] for o in range(3)]).unsqueeze(0)
    assert torch.allclose(out["logits"], expected, atol=1e-10)
    assert torch.allclose(out["bag_feature"], bag, atol=1e-10)  # B itself: one row per class


def test_consistency_loss_averages_per_row_losses() -> None:
    # The reduction DSMIL's C rows rely on, by hand. Teacher rows [1, 0, 0] and [0, 1, 0] are one-hot at
    # τ_t = 0.1 (to e⁻¹⁰); student rows [0, 0, 0] and [ln 2, 0, 0] (τ_s = 1) give −log(1/3) = ln 3 and
    # −log(1/4) = ln 4: mean ½·ln 12 ≈ 1.2425. Comparing the class means instead (t̄/τ_t = [5, 5, 0] →
    # p₀ = e⁵/(2e⁵ + 1); s̄ = [ln √2, 0, 0]) gives ln(2 + √2) − p₀·ln √2 ≈ 1.0552.
    teacher_rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    student_rows = torch.tensor([[0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0]])
    assert consistency_loss(student_rows, teacher_rows).item() == pytest.approx(0.5 * math.log(12), abs=1e-4)
    class_mean = consistency_loss(student_rows.mean(0, keepdim=True), teacher_rows.mean(0, keepdim=True))
    p0 = math.exp(5) / (2 * math.exp(5) + 1)
    expected_mean = math.log(2 + math.sqrt(2)) - p0 * math.log(math.sqrt(2))
    assert class_mean.item() == pytest.approx(expected_mean, abs=1e-5)


def test_dsmil_mhim_step_uses_every_class_row() -> None:
    # Through the real MHIM step (no masking, dropout off, teacher = student): the loss is DSMIL's own
    # loss plus α · the mean over the C rows of B of the per-row consistency loss.
    torch.manual_seed(0)
    student = DSMIL(6, 3, dropout=0.0)
    x, y = 20 * torch.randn(9, 6), torch.tensor([2])  # large inputs: peaked attention, distinct rows of B
    step = MHIMStep(student, _mhim_params(alpha=0.5), None, total_steps=1)
    loss = step.loss(student, x, y, 0, torch.Generator().manual_seed(0))
    out = student(x)
    rows = out["bag_feature"]
    assert rows.shape == (3, 512)
    per_row = -(torch.softmax(rows / 0.1, -1) * torch.log_softmax(rows, -1)).sum(-1)
    expected = student.loss(out, y) + 0.5 * per_row.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    mean_row = rows.mean(0)
    class_mean = -(torch.softmax(mean_row / 0.1, -1) * torch.log_softmax(mean_row, -1)).sum()
    assert abs(per_row.mean() - class_mean).item() > 0.03  # the example tells the two reductions apart


def test_dsmil_loss_and_probabilities_by_hand() -> None:
    model = DSMIL(4, 2)
    out = {
        "logits": torch.tensor([[2.0, 0.0]]),
        "instance_logits": torch.tensor([[1.0, 3.0], [2.0, -1.0], [0.0, 0.0]]),  # max over instances: [2, 3]
    }
    loss = model.loss(out, torch.tensor([0]))
    expected = 0.5 * math.log(1 + math.exp(-2)) + 0.5 * math.log(1 + math.exp(1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    p_bag0 = 1 / (1 + math.exp(-2))
    p_inst0 = 1 / (1 + math.exp(1))
    probs = model.probabilities(out)
    assert probs[0, 0].item() == pytest.approx(0.5 * (p_bag0 + p_inst0), rel=1e-6)
    assert probs.sum().item() == pytest.approx(1.0)


def test_dsmil_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = DSMIL(32, 3).train()
    out = model(torch.randn(20, 32))
    model.loss(out, torch.tensor([1])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dsmil_permutation_invariant() -> None:
    torch.manual_seed(0)
    model = DSMIL(16, 2).eval()
    x = torch.randn(25, 16)
    perm = torch.randperm(25)
    a, b = model(x), model(x[perm])
    assert torch.allclose(a["logits"], b["logits"], atol=1e-6)
    assert torch.allclose(a["scores"][perm], b["scores"])


def test_dsmil_eval_deterministic_train_stochastic() -> None:
    torch.manual_seed(0)
    model = build_model("dsmil", 32, 2)
    assert isinstance(model, DSMIL)
    x = torch.randn(30, 32)
    model.eval()
    a, b = model(x), model(x.unsqueeze(0))
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["scores"], b["scores"])
    model.train()
    assert not torch.equal(model(x)["logits"], model(x)["logits"])


def test_dsmil_value_dropout_option() -> None:
    model = DSMIL(16, 2, v_dropout=0.5)
    dropouts = [m for m in model.v if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5
