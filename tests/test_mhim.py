"""MHIM-MIL building blocks and the ABMIL model: golden values from the spec, properties, shapes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slidestream.cluster.config import load_config
from slidestream.cluster.recipes import PAPER_RECIPES
from slidestream.trainers.mil.mhim import (
    PRESETS,
    consistency_loss,
    cosine_decay,
    cosine_value,
    ema_update,
    mask_instances,
)
from slidestream.trainers.models.abmil import ABMIL
from slidestream.trainers.models.layers import InstanceEmbedding, init_weights


def _golden_attn() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.softmax(torch.randn(1, 40), -1)[0]


def _masked(kept: torch.Tensor, n: int) -> set[int]:
    return set(range(n)) - set(kept.tolist())


def test_golden_high_mask() -> None:
    kept = mask_instances(_golden_attn(), mask_ratio_h=0.1)
    assert _masked(kept, 40) == {13, 23, 32, 39}


def test_golden_low_high_mask() -> None:
    attn = _golden_attn()
    kept = mask_instances(attn, mask_ratio_l=0.5, mask_ratio_h=0.1)
    lowest = set(torch.argsort(attn)[:20].tolist())
    masked = _masked(kept, 40)
    assert len(masked) == 24 and kept.numel() == 16
    assert masked == {13, 23, 32, 39} | lowest


def test_high_ratio_subsamples_candidates() -> None:
    attn = _golden_attn()
    gen = torch.Generator().manual_seed(1)
    masked = _masked(mask_instances(attn, mask_ratio_h=0.1, mask_ratio_hr=0.5, generator=gen), 40)
    top8 = set(torch.topk(attn, 8).indices.tolist())
    assert len(masked) == 4 and masked <= top8


def test_random_mask_count_and_reproducible() -> None:
    scores = torch.rand(100)
    a = mask_instances(scores, mask_ratio=0.7, generator=torch.Generator().manual_seed(3))
    b = mask_instances(scores, mask_ratio=0.7, generator=torch.Generator().manual_seed(3))
    assert a.numel() == 30 and torch.equal(a, b)


def test_multi_head_vote() -> None:
    scores = torch.zeros(3, 6)
    scores[0, [1, 2]] = 1.0
    scores[1, [1, 4]] = 1.0
    scores[2, [1, 2]] = 1.0
    kept = mask_instances(scores, mask_ratio_h=2 / 6)
    assert _masked(kept, 6) == {1, 2}


def test_multi_head_low_vote() -> None:
    # Each head votes for its 2 lowest: head 0 → {0, 1}, head 1 → {0, 2}; votes 0:2, 1:1, 2:1, 3:0, so
    # the 2 most-voted are 0 and one of the tied 1/2 (lower index: 1). The head mean [0, .5, .5, .2]
    # would drop {0, 3} instead: instance 3 is never any head's low pick and must stay.
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.2], [0.0, 0.9, 0.1, 0.2]])
    kept = mask_instances(scores, mask_ratio_l=0.5)
    assert _masked(kept, 4) == {0, 1}


def test_mask_never_drops_all() -> None:
    kept = mask_instances(torch.tensor([0.1, 0.5, 0.4]), mask_ratio=1.0, mask_ratio_h=0.3)
    assert kept.tolist() == [2]  # highest score outside the high set {1}


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 300),
    heads=st.sampled_from([0, 1, 4]),
    r=st.floats(0.0, 1.0),
    low=st.floats(0.0, 1.0),
    high=st.floats(0.0, 1.0),
    hr=st.floats(0.0, 1.0, exclude_min=True),
    seed=st.integers(0, 2**16),
)
def test_mask_properties(n: int, heads: int, r: float, low: float, high: float, hr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand((heads, n) if heads else (n,), generator=gen)
    kept = mask_instances(
        scores, mask_ratio=r, mask_ratio_l=low, mask_ratio_h=high, mask_ratio_hr=hr, generator=gen
    )
    values = kept.tolist()
    assert len(values) >= 1
    assert values == sorted(set(values))
    assert all(0 <= i < n for i in values)


def test_mask_rejects_bad_ratios() -> None:
    with pytest.raises(ValueError):
        mask_instances(torch.rand(5), mask_ratio_hr=0.0)
    with pytest.raises(ValueError):
        mask_instances(torch.rand(5), mask_ratio=1.5)


def test_golden_cosine_schedule() -> None:
    golden = [0.01, 0.009755, 0.009045, 0.007939, 0.006545, 0.005, 0.003455, 0.002061, 0.000955, 0.000245]
    assert cosine_decay(0.01, 0.0, 2 * 5) == pytest.approx(golden, abs=1e-6)
    assert cosine_value(3, 10, 0.01, 0.0) == pytest.approx(golden[3], abs=1e-6)


def test_golden_consistency_loss() -> None:
    torch.manual_seed(2)
    s, t = torch.randn(1, 512), torch.randn(1, 512)
    assert consistency_loss(s, t).item() == pytest.approx(6.896681785583496, abs=1e-5)


def test_consistency_loss_teacher_detached() -> None:
    s = torch.randn(2, 8, requires_grad=True)
    t = torch.randn(2, 8, requires_grad=True)
    consistency_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_ema_update_parameters_only() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
        p.add_(torch.randn_like(p))
    with torch.no_grad():
        student[1].running_mean.fill_(5.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    m = 0.9
    ema_update(teacher, student, m)
    for name, p in teacher.named_parameters():
        expected = m * before[name] + (1 - m) * dict(student.named_parameters())[name]
        assert torch.allclose(p, expected)
        assert p.grad is None and not p.requires_grad
    for name, buf in teacher.named_buffers():
        assert torch.equal(buf, before[name])


def test_presets() -> None:
    assert set(PRESETS) == {"C16-ABMIL", "C16-TransMIL", "TCGA-ABMIL"}
    c16 = PRESETS["C16-ABMIL"]
    assert (c16["mask_ratio_h"], c16["mask_ratio_hr"]) == (0.01, 0.5)
    assert (c16["mask_ratio"], c16["alpha"]) == (0.5, 0.1)
    assert PRESETS["C16-TransMIL"]["mask_ratio_l"] == 0.8
    assert PRESETS["TCGA-ABMIL"]["alpha"] == 0.5


# The MHIM-MIL paper's recipe as its official code runs it (CAMELYON16 setting), key by key.
MHIM_PAPER_RECIPE = {
    "train.epochs": 200,  # --num_epoch 200
    "train.lr": 2e-4,  # Adam, --lr 2e-4
    "train.lr_schedule": "cosine",  # cosine over the epochs
    "train.weight_decay": 1e-5,
    "train.grad_clip": None,  # no clipping
    "train.selection": "early_stop",
    "train.monitor": "val_auc",  # best checkpoint and early stopping on validation AUC
    "train.patience": 30,  # EarlyStopping(patience=30) on CAMELYON16
    "train.min_epochs": 132,  # stops only when the 0-based epoch > 130
    "train.keep_early_epochs": True,  # ... but the best checkpoint may come from any epoch
    "train.standardize": False,  # raw features
    "train.folds": 3,  # --cv_fold 3
    "train.val_frac": 0.13,  # --val_ratio 0.13 (their runs with a validation split)
    "train.seeds": [2021, 2022, 2023],  # the published logs' seeds
}


def _dotted(config: object, key: str) -> object:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def test_paper_recipe_row_and_resolution() -> None:
    assert PAPER_RECIPES["train"] == MHIM_PAPER_RECIPE
    config = load_config(None, ["train.recipe=paper"])
    for key, value in MHIM_PAPER_RECIPE.items():
        assert _dotted(config, key) == value, key
    assert config.train.mhim.preset == "auto" and config.train.protocol == "standard"
    assert _dotted(load_config(None, ["train.recipe=default"]), "train.epochs") != 200


@pytest.mark.parametrize("in_dim", [1024, 7])
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("gated", [False, True])
def test_abmil_shapes(in_dim: int, n_classes: int, gated: bool) -> None:
    model = ABMIL(in_dim, n_classes=n_classes, gated=gated).eval()
    for x in (torch.randn(13, in_dim), torch.randn(1, 13, in_dim)):
        out = model(x)
        assert out["logits"].shape == (1, n_classes)
        assert out["bag_feature"].shape == (1, 512)
        assert out["scores"].shape == (13,)
        assert out["scores"].sum().item() == pytest.approx(1.0, abs=1e-5)


def test_abmil_attention_has_no_bias_and_init() -> None:
    model = ABMIL(64, gated=False)
    assert model.attn_hidden.bias is None and model.attn_out.bias is None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0
    big = nn.Linear(1000, 1000)
    init_weights(big)
    assert big.weight.std().item() == pytest.approx((2 / 2000) ** 0.5, rel=0.05)
    assert torch.count_nonzero(big.bias) == 0


def test_instance_embedding() -> None:
    emb = InstanceEmbedding(10)
    assert isinstance(emb[0], nn.Linear) and emb[0].out_features == 512
    assert isinstance(emb[1], nn.ReLU) and isinstance(emb[2], nn.Dropout) and emb[2].p == 0.25
