"""MHIM-MIL building blocks: hard-instance masking, schedules, consistency loss and EMA (no Ray).

Choices where the official code is ambiguous or accidental (the official MHIM-MIL code's):

* Kept instances are returned in ascending original index order (the official order comes from a
  Python ``set`` and is an accident).
* Counts are ``ceil(N · ratio)`` computed with a 1e-9 tolerance so that float noise such as
  ``10 · 0.7 = 7.000000000000001`` rounds to 7, not 8; any ratio > 0 still drops at least one
  instance, and counts are capped at N.
* Multi-head scores (H, N): both the high-score candidates and the low-score set come from a vote,
  as in the official code: each head votes for its k highest (or lowest) instances and the k
  most-voted instances win, ties broken by lower index (the official tie order is unspecified). Only
  the fallback below uses the mean score over heads.
* Never every instance is dropped: if the union covers all N, the highest-(mean-)score instance
  outside the high-score set is kept; if the high set itself is all N, the overall argmax is kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "PRESETS",
    "consistency_loss",
    "cosine_decay",
    "cosine_value",
    "ema_update",
    "mask_instances",
]

_EPS = 1e-9


def _count(n: int, ratio: float) -> int:
    """``ceil(n · ratio)`` with float tolerance; ≥ 1 when ratio > 0, ≤ n always."""
    if ratio <= 0.0 or n == 0:
        return 0
    if ratio >= 1.0:  # also catches h/hr overflowing to inf for tiny hr
        return n
    return max(1, min(n, math.ceil(n * ratio - _EPS)))


def _top_indices(score: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """Indices of the k largest (or smallest) entries of a 1-D tensor; ties go to the lower index."""
    order = torch.sort(score, descending=largest, stable=True).indices
    return order[:k]


def _voted_indices(scores: Tensor, k: int, *, largest: bool) -> Tensor:
    """The k highest (or lowest) instances for (N,) scores; for (H, N) scores each head votes for its
    own k highest (or lowest) and the k most-voted instances are taken."""
    if scores.dim() == 1:
        return _top_indices(scores, k, largest=largest)
    votes = torch.zeros(scores.shape[1], dtype=torch.long, device=scores.device)
    for head in scores:
        votes[_top_indices(head, k, largest=largest)] += 1
    return _top_indices(votes, k)


def _random_subset(pool: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k entries of ``pool`` drawn uniformly without replacement."""
    perm = torch.randperm(pool.numel(), generator=generator)
    return pool[perm[:k].to(pool.device)]


def mask_instances(
    scores: Tensor,
    *,
    mask_ratio: float = 0.0,
    mask_ratio_l: float = 0.0,
    mask_ratio_h: float = 0.0,
    mask_ratio_hr: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Return the sorted indices of the instances KEPT after masked hard instance mining.

    ``scores`` are teacher instance scores, (N,) or (H, N). Every ratio is a fraction to drop:
    random ``ceil(N·mask_ratio)``; the ``ceil(N·mask_ratio_l)`` lowest-score; and a random
    ``ceil(N·mask_ratio_h)`` of the top ``ceil(N·mask_ratio_h/mask_ratio_hr)`` (multi-head scores:
    lowest and top by per-head vote). The dropped set is the union; at least one instance is always
    kept (see module docstring for the rule).
    """
    if scores.dim() not in (1, 2) or scores.shape[-1] == 0:
        raise ValueError(f"scores must be (N,) or (H, N) with N ≥ 1, got {tuple(scores.shape)}")
    ratios = {"mask_ratio": mask_ratio, "mask_ratio_l": mask_ratio_l, "mask_ratio_h": mask_ratio_h}
    for name, value in ratios.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0.0 < mask_ratio_hr <= 1.0:
        raise ValueError(f"mask_ratio_hr must be in (0, 1], got {mask_ratio_hr}")

    scores = scores.detach()
    n = scores.shape[-1]
    device = scores.device
    mean_score = scores if scores.dim() == 1 else scores.float().mean(dim=0)
    dropped = torch.zeros(n, dtype=torch.bool, device=device)
    high = torch.zeros(n, dtype=torch.bool, device=device)

    k_high = _count(n, mask_ratio_h)
    if k_high:
        k_cand = max(k_high, _count(n, mask_ratio_h / mask_ratio_hr))
        cand = _voted_indices(scores, k_cand, largest=True)
        chosen = cand if k_cand == k_high else _random_subset(cand, k_high, generator)
        high[chosen] = True
        dropped |= high
    k_low = _count(n, mask_ratio_l)
    if k_low:
        dropped[_voted_indices(scores, k_low, largest=False)] = True
    k_rand = _count(n, mask_ratio)
    if k_rand:
        dropped[_random_subset(torch.arange(n, device=device), k_rand, generator)] = True

    if bool(dropped.all()):
        outside_high = mean_score.masked_fill(high, float("-inf"))
        keep = int(outside_high.argmax()) if not bool(high.all()) else int(mean_score.argmax())
        dropped[keep] = False
    return torch.nonzero(~dropped, as_tuple=False).flatten()


def cosine_value(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) towards ``end`` (reached at ``total_steps``)."""
    if total_steps <= 0:
        return float(start)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * step / total_steps))


def cosine_decay(start: float, end: float, total_steps: int) -> list[float]:
    """Per-step cosine schedule (length ``total_steps``), e.g. ``epochs × iterations_per_epoch`` steps."""
    return [cosine_value(i, total_steps, start, end) for i in range(total_steps)]


def consistency_loss(student: Tensor, teacher: Tensor, tau_s: float = 1.0, tau_t: float = 0.1) -> Tensor:
    """Σ_d −softmax(teacher/τ_t)_d · log_softmax(student/τ_s)_d, teacher detached, mean over rows."""
    target = torch.softmax(teacher.detach() / tau_t, dim=-1)
    log_prob = torch.log_softmax(student / tau_s, dim=-1)
    return -(target * log_prob).sum(dim=-1).mean()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ_T ← m·θ_T + (1−m)·θ_S over parameters only (buffers are left untouched)."""
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student must have the same parameter names")
    for name, t_param in t_params.items():
        t_param.mul_(momentum).add_(s_params[name].detach().to(t_param.dtype), alpha=1.0 - momentum)


# Paper recipes (MHIM-MIL, ICCV 2023). ``mask_ratio_h_decay``: cosine decay of h to 0 over training;
# ``momentum_cosine``: EMA momentum follows a cosine from ``momentum`` to 1.0. TCGA-ABMIL states no hr,
# so it uses hr = 1 (plain top-h).
_COMMON = {"mask_ratio_h_decay": True, "tau_s": 1.0, "tau_t": 0.1, "momentum": 0.9999}
PRESETS: dict[str, dict] = {
    "C16-ABMIL": {
        **_COMMON,
        "model": "abmil",
        "mask_ratio": 0.5,
        "mask_ratio_l": 0.0,
        "mask_ratio_h": 0.01,
        "mask_ratio_hr": 0.5,
        "alpha": 0.1,
        "momentum_cosine": False,
    },
    "C16-TransMIL": {
        **_COMMON,
        "model": "transmil",
        "mask_ratio": 0.0,
        "mask_ratio_l": 0.8,
        "mask_ratio_h": 0.03,
        "mask_ratio_hr": 0.5,
        "alpha": 0.1,
        "momentum_cosine": True,
    },
    "TCGA-ABMIL": {
        **_COMMON,
        "model": "abmil",
        "mask_ratio": 0.7,
        "mask_ratio_l": 0.2,
        "mask_ratio_h": 0.02,
        "mask_ratio_hr": 1.0,
        "alpha": 0.5,
        "momentum_cosine": True,
    },
}
