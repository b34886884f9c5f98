"""CLAM-SB and DTFD-MIL: shapes, gradients, CLAM's instance clustering loss and DTFD's pseudo-bags."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from slidestream.trainers.models import build_model
from slidestream.trainers.models.clam import CLAMSB
from slidestream.trainers.models.dtfd import DISTILL_MODES, DTFDMIL

SIZES = [1, 3, 7, 300]


def _target(label: int) -> torch.Tensor:
    return torch.tensor([label])


def _assert_all_grads(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


# ---------------------------------------------------------------- CLAM-SB


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(("d", "c"), [(32, 2), (1024, 3)])
def test_clam_shapes(n: int, d: int, c: int) -> None:
    torch.manual_seed(0)
    model = CLAMSB(d, c, subtyping=c > 2)
    out = model(torch.randn(1, n, d))
    assert out["logits"].shape == (1, c)
    assert out["bag_feature"].shape == (1, 512)
    assert out["scores"].shape == (n,)
    assert out["instances"].shape == (n, 512) and out["attention_raw"].shape == (n,)
    assert torch.allclose(out["scores"].sum(), torch.tensor(1.0), atol=1e-5)
    loss = model.loss(out, _target(c - 1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()


def _known_attention_clam(n_classes: int, subtyping: bool) -> tuple[CLAMSB, torch.Tensor]:
    """A CLAM whose raw attention is 0.5·tanh(relu(x_0)): increasing in feature 0 for positive x_0."""
    torch.manual_seed(0)
    model = CLAMSB(4, n_classes, k_sample=3, subtyping=subtyping).eval()
    with torch.no_grad():
        lin = model.embed[0]
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[0, 0] = 1.0
        lin.weight[1, 1] = 1.0
        att = model.attention
        for layer in (att.attn_v, att.attn_u):
            layer.weight.zero_()
            layer.bias.zero_()
        att.attn_out.weight.zero_()
        att.attn_v.weight[0, 0] = 1.0
        att.attn_out.weight[0, 0] = 1.0
    x = torch.randn(10, 4)
    x[:, 0] = torch.randperm(10).float() * 0.15 + 0.1  # distinct, positive, within tanh's useful range
    x[:, 1] = torch.rand(10) + 0.5  # a second feature, so the instance classifiers see varied inputs
    return model, x


def test_clam_instance_loss_picks_top_and_bottom_k() -> None:
    model, x = _known_attention_clam(2, subtyping=False)
    out = model(x)
    order = torch.argsort(x[:, 0], descending=True)
    top, bottom = order[:3], order[-3:]
    assert torch.equal(torch.topk(out["scores"], 3).indices, top)
    h = out["instances"]
    for label in (0, 1):
        expected = F.cross_entropy(
            model.instance_classifiers[label](h[torch.cat([top, bottom])]), torch.tensor([1, 1, 1, 0, 0, 0])
        )
        got = model.instance_loss(out, _target(label))
        assert torch.allclose(got, expected)
        # The same loss on the wrong instances (a middle slice) would differ: the check has teeth.
        wrong = F.cross_entropy(
            model.instance_classifiers[label](h[order[2:8]]), torch.tensor([1, 1, 1, 0, 0, 0])
        )
        assert not torch.allclose(got, wrong)
        bag_ce = F.cross_entropy(out["logits"], _target(label))
        assert torch.allclose(model.loss(out, _target(label)), 0.7 * bag_ce + 0.3 * expected)


def test_clam_subtyping_adds_out_of_class_negatives() -> None:
    model, x = _known_attention_clam(3, subtyping=True)
    model.bag_weight = 0.4
    out = model(x)
    order = torch.argsort(x[:, 0], descending=True)
    top, bottom = order[:3], order[-3:]
    h = out["instances"]
    label = 1
    in_class = F.cross_entropy(
        model.instance_classifiers[1](h[torch.cat([top, bottom])]), torch.tensor([1, 1, 1, 0, 0, 0])
    )
    out_class = [
        F.cross_entropy(model.instance_classifiers[c](h[top]), torch.zeros(3, dtype=torch.long))
        for c in (0, 2)
    ]
    expected_inst = (in_class + sum(out_class)) / 3
    assert torch.allclose(model.instance_loss(out, _target(label)), expected_inst)
    bag_ce = F.cross_entropy(out["logits"], _target(label))
    assert torch.allclose(model.loss(out, _target(label)), 0.4 * bag_ce + 0.6 * expected_inst)


def test_clam_small_bags_cap_k() -> None:
    model = CLAMSB(8, 2).eval()
    assert [model.instance_k(n) for n in (1, 2, 5, 16, 17, 300)] == [0, 1, 2, 8, 8, 8]
    out = model(torch.randn(1, 8))
    assert model.instance_loss(out, _target(1)) is None
    assert torch.allclose(model.loss(out, _target(1)), F.cross_entropy(out["logits"], _target(1)))
    out5 = model(torch.randn(5, 8))
    assert model.instance_loss(out5, _target(0)) is not None


def test_clam_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = CLAMSB(32, 3, subtyping=True).train()
    model.loss(model(torch.randn(50, 32)), _target(2)).backward()
    _assert_all_grads(model)


def test_clam_without_subtyping_trains_only_the_true_class_classifier() -> None:
    torch.manual_seed(0)
    model = CLAMSB(32, 3).train()
    model.loss(model(torch.randn(50, 32)), _target(1)).backward()
    assert model.instance_classifiers[1].weight.grad.abs().sum() > 0
    assert model.instance_classifiers[0].weight.grad is None
    assert model.instance_classifiers[2].weight.grad is None


# ---------------------------------------------------------------- DTFD-MIL


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(("d", "c"), [(32, 2), (1024, 3)])
@pytest.mark.parametrize("distill", DISTILL_MODES)
def test_dtfd_shapes(n: int, d: int, c: int, distill: str) -> None:
    torch.manual_seed(0)
    model = DTFDMIL(d, c, distill=distill)
    out = model(torch.randn(1, n, d))
    g = min(5, n)
    assert out["logits"].shape == (1, c)
    assert out["bag_feature"].shape == (1, 512)
    assert out["scores"].shape == (n,)
    assert out["pseudo_logits"].shape == (g, c)
    assert out["distilled"].shape == ((2 * g if distill == "MaxMinS" else g), 512)
    assert torch.allclose(out["scores"].sum(), torch.tensor(1.0), atol=1e-5)
    loss = model.loss(out, _target(c - 1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()


@pytest.mark.parametrize("n", [1, 3, 5, 7, 12, 300])
def test_dtfd_pseudo_bags_partition_the_bag(n: int) -> None:
    model = DTFDMIL(16, 2).train()
    chunks = model.split(n, torch.Generator().manual_seed(n))
    assert len(chunks) == min(5, n)
    assert torch.equal(torch.sort(torch.cat(chunks)).values, torch.arange(n))
    sizes = [len(c) for c in chunks]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    out = model(torch.randn(n, 16), generator=torch.Generator().manual_seed(n))
    counts = torch.bincount(out["groups"], minlength=len(chunks))
    assert counts.tolist() == sizes
    if n >= 5:  # the split is a shuffle, not consecutive runs of instances
        assert not torch.equal(out["groups"], torch.sort(out["groups"]).values)


@pytest.mark.parametrize("distill", DISTILL_MODES)
def test_dtfd_scores_are_tier1_times_tier2_attention(distill: str) -> None:
    torch.manual_seed(0)
    model = DTFDMIL(16, 2, distill=distill).eval()
    out = model(torch.randn(23, 16))
    scores, groups, h = out["scores"], out["groups"], out["instances"]
    assert (scores > 0).all()
    assert torch.allclose(scores.sum(), torch.tensor(1.0), atol=1e-6)
    for g in range(5):
        member = groups == g
        a = torch.softmax(model.attention1(h[member]), dim=0)
        assert torch.allclose(scores[member], a * out["pseudo_attention"][g], atol=1e-6)
    b = torch.softmax(model.attention2(out["distilled"]), dim=0)
    assert torch.allclose(out["pseudo_attention"].sum(), torch.tensor(1.0), atol=1e-6)
    pooled = (b.unsqueeze(-1) * out["distilled"]).sum(0, keepdim=True)
    assert torch.allclose(out["bag_feature"], pooled, atol=1e-5)
    assert torch.allclose(out["logits"], model.head(out["bag_feature"]))


@pytest.mark.parametrize("c", [2, 3])
@pytest.mark.parametrize("distill", DISTILL_MODES)
def test_dtfd_distilled_features(distill: str, c: int) -> None:
    torch.manual_seed(1)
    model = DTFDMIL(16, c, distill=distill).eval()
    out = model(torch.randn(40, 16))
    h, groups, feats = out["instances"], out["groups"], out["distilled"]
    for g in range(5):
        hg = h[groups == g]
        a = torch.softmax(model.attention1(hg), dim=0)
        weighted = a.unsqueeze(-1) * hg
        pooled = weighted.sum(0)
        assert torch.allclose(out["pseudo_logits"][g], model.classifier1(pooled), atol=1e-5)
        if distill == "AFS":
            assert torch.allclose(feats[g], pooled, atol=1e-5)
            continue
        cls = 1 if c == 2 else int(model.classifier1(pooled).argmax())
        prob = torch.softmax(weighted @ model.classifier1.weight.t(), dim=-1)[:, cls]
        if distill == "MaxS":
            assert torch.equal(feats[g], hg[prob.argmax()])
        else:
            assert torch.equal(feats[2 * g], hg[prob.argmax()])
            assert torch.equal(feats[2 * g + 1], hg[prob.argmin()])


def test_dtfd_eval_is_deterministic_and_training_is_random() -> None:
    torch.manual_seed(0)
    model = DTFDMIL(16, 2)
    x = torch.randn(300, 16)
    model.eval()
    first = model(x)
    torch.manual_seed(123)  # the global RNG must not matter in eval mode
    second = model(x)
    assert torch.equal(first["groups"], second["groups"])
    assert torch.equal(first["logits"], second["logits"]) and torch.equal(first["scores"], second["scores"])
    model.train()
    torch.manual_seed(5)
    a = model(x)["groups"]
    torch.manual_seed(5)
    b = model(x)["groups"]
    c = model(x)["groups"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1 = model(x, generator=torch.Generator().manual_seed(9))["groups"]
    g2 = model(x, generator=torch.Generator().manual_seed(9))["groups"]
    g3 = model(x, generator=torch.Generator().manual_seed(10))["groups"]
    assert torch.equal(g1, g2) and not torch.equal(g1, g3)


def test_dtfd_loss_is_tier1_mean_plus_tier2() -> None:
    torch.manual_seed(0)
    model = DTFDMIL(16, 3).eval()
    out = model(torch.randn(30, 16))
    target = _target(2)
    tier1 = torch.stack([F.cross_entropy(row.unsqueeze(0), target) for row in out["pseudo_logits"]]).mean()
    assert torch.allclose(model.loss(out, target), tier1 + F.cross_entropy(out["logits"], target))


@pytest.mark.parametrize("distill", DISTILL_MODES)
def test_dtfd_gradients_reach_every_parameter(distill: str) -> None:
    torch.manual_seed(0)
    model = DTFDMIL(32, 2, distill=distill).train()
    model.loss(model(torch.randn(60, 32)), _target(1)).backward()
    _assert_all_grads(model)


def test_dtfd_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="distill"):
        DTFDMIL(16, 2, distill="mean")
    with pytest.raises(ValueError, match="n_groups"):
        DTFDMIL(16, 2, n_groups=0)


# ---------------------------------------------------------------- registry


def test_registry_builds_both() -> None:
    clam = build_model("clam_sb", 32, 3, subtyping=True, k_sample=4)
    dtfd = build_model("dtfd", 32, 3, distill="MaxMinS", n_groups=3)
    assert isinstance(clam, CLAMSB) and clam.k_sample == 4 and clam.embed[0].in_features == 32
    assert isinstance(dtfd, DTFDMIL) and dtfd.n_groups == 3
    # Zero biases from the shared init; the probabilities are a softmax of the bag logits.
    assert all(
        m.bias.abs().sum() == 0 for m in dtfd.modules() if isinstance(m, nn.Linear) and m.bias is not None
    )
    out = dtfd.eval()(torch.randn(10, 32))
    assert torch.allclose(dtfd.probabilities(out).sum(), torch.tensor(1.0))
