"""ICMIL step 2: fine-tune the tile embedder by distillation from the frozen bag classifier.

The teacher is the current embedder E_T followed by the bag classifier's reduction layer and its bag
head, applied to every tile: the ABMIL bag logit is the attention-weighted mean of these per-tile logits,
so the bag head scores single tiles. DTFD-MIL: its TIER-2 bag head on the tier-1 reduction output of each
tile (as the official step-2 script does), not the tier-1 pseudo-bag classifier. The student starts as an
exact copy of all three parts and all of it trains. Per batch of tiles, with
p_T = softmax(head_T(red_T(E_T(x)))) and m_T = red_T(E_T(x)) from the clean view x:

* loss_c  = KL(p_T ‖ softmax(head_S(red_S(E_S(x′)))))     x′: flipped, randomly resized crop of x
* loss_w1 = KL(p_T ‖ softmax(head_S(red_S(E_T(x)))))      keeps the student's head consistent
* loss_w2 = KL(softmax₅₁₂(m_T) ‖ softmax₅₁₂(red_S(E_T(x))))  keeps its reduction consistent

total = loss_c + w1·loss_w1 + w2·loss_w2. KL is the element-wise mean over tiles × classes (resp. × 512
dimensions), as the official code's `nn.KLDivLoss()` computes it, not the per-tile sum ("batchmean").
The student's reduction runs without dropout (so at initialisation loss_w1 = loss_w2 = 0 exactly);
the student encoder's BatchNorm layers train.

Confidence (journal version, `icmil.confidence`): loss_c weighted per tile by |2a − 1|^β, a ∈ [0, 1] the
teacher's confidence in the tile within the batch. ABMIL: a = the RAW gated attention score (no softmax)
min-max normalised over the batch. DTFD-MIL ("dual"): a = minmax(softmax(tier-2 attention)) ·
minmax(softmax(tier-1 attention)), both softmaxed over the batch, and the teacher's logits become
0.7 · tier-2 head + 0.3 · tier-1 head (the targets of loss_c and loss_w1).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slidestream.pipelines.encoders import TileEncoder
from slidestream.trainers.models.abmil import ABMIL
from slidestream.trainers.models.base import MILModel
from slidestream.trainers.models.dtfd import DTFDMIL

__all__ = [
    "DEFAULT_BETA",
    "INSTANCE_HEADS",
    "InstanceTeacher",
    "augmented_view",
    "confidence_weights",
    "distill_losses",
    "make_student",
    "minmax",
]

# MIL model → the attribute holding the Linear that scores one embedded instance: the bag head of each.
# DTFD-MIL's `head` is its tier-2 bag head (official: att_classifier.classifier.fc), not `classifier1`.
INSTANCE_HEADS: dict[str, str] = {"abmil": "head", "maxpool": "head", "dtfd": "head"}
DEFAULT_BETA: dict[str, float] = {"abmil": 6.0, "dtfd": 2.0}
DUAL_MIX = (0.7, 0.3)  # DTFD confidence: teacher logits = 0.7 · tier-2 head + 0.3 · tier-1 head


def check_model(name: str) -> None:
    if name not in INSTANCE_HEADS:
        raise ValueError(
            f"train.model {name!r}: ICMIL needs a bag classifier whose logit is a mean of per-tile logits; "
            f"choose one of {', '.join(INSTANCE_HEADS)}"
        )


def minmax(x: Tensor) -> Tensor:
    """x rescaled to [0, 1] over the batch; all zeros for a flat batch (the official code divides by 0)."""
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


@dataclass
class InstanceTeacher:
    """The frozen tile classifier: encoder → reduction → instance head (all in eval mode, no gradients).
    `dual`: DTFD-MIL with confidence weights (the teacher's logits mix both tiers' heads, see module doc)."""

    encoder: TileEncoder
    reduction: nn.Module
    head: nn.Module
    mil: MILModel
    model_name: str
    dual: bool = False

    @classmethod
    def from_mil(
        cls, encoder: TileEncoder, mil: MILModel, model_name: str, confidence: bool = False
    ) -> InstanceTeacher:
        check_model(model_name)
        mil.requires_grad_(False).eval()
        head = getattr(mil, INSTANCE_HEADS[model_name])
        return cls(encoder, mil.embed, head, mil, model_name, dual=confidence and isinstance(mil, DTFDMIL))

    def to(self, device: torch.device) -> InstanceTeacher:
        self.encoder.to(device)
        self.mil.to(device)
        return self

    def logits(self, m: Tensor) -> Tensor:
        """The teacher's class logits (N, C) of embedded tiles m (N, 512)."""
        if not self.dual:
            return self.head(m)
        assert isinstance(self.mil, DTFDMIL)
        return DUAL_MIX[0] * self.head(m) + DUAL_MIX[1] * self.mil.classifier1(m)

    @torch.no_grad()
    def confidence(self, m: Tensor) -> Tensor:
        """a ∈ [0, 1] per tile of a batch of embedded tiles m (N, 512), as the journal version defines it."""
        if isinstance(self.mil, ABMIL):
            return minmax(self.mil.attention_logits(m).float())
        if isinstance(self.mil, DTFDMIL):
            tier2 = torch.softmax(self.mil.attention2(m).float(), dim=0)
            tier1 = torch.softmax(self.mil.attention1(m).float(), dim=0)
            return minmax(tier2) * minmax(tier1)
        raise ValueError(f"icmil.confidence needs an attention-based bag classifier, not {self.model_name!r}")


class Student(nn.Module):
    """Trainable copies of the teacher's encoder network, reduction layer and instance head."""

    def __init__(self, teacher: InstanceTeacher) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(teacher.encoder.model)
        self.reduction = copy.deepcopy(teacher.reduction)
        self.head = copy.deepcopy(teacher.head)
        self.requires_grad_(True)

    def train(self, mode: bool = True) -> Student:
        """Only the encoder follows `mode`: the reduction layer keeps its dropout off (see module doc)."""
        super().train(mode)
        self.reduction.eval()
        self.head.eval()
        return self

    def head_params(self) -> list[nn.Parameter]:
        return [*self.reduction.parameters(), *self.head.parameters()]


def make_student(teacher: InstanceTeacher) -> Student:
    return Student(teacher).train()


def _kl(log_p: Tensor, log_q: Tensor, weights: Tensor | None = None) -> Tensor:
    """KL(p ‖ q) from log-probabilities as the element-wise mean; with per-row `weights`, the weighted
    mean over rows. (Log-space targets make KL of identical logits exactly 0.)"""
    terms = F.kl_div(log_q, log_p, reduction="none", log_target=True)
    if weights is None:
        return terms.mean()
    return (terms.mean(dim=1) * weights).mean()


def confidence_weights(a: Tensor, beta: float) -> Tensor:
    """|2a − 1|^β for confidences a ∈ [0, 1]: tiles the teacher is sure about (a near 0 or 1) weigh most."""
    return (2 * a - 1).abs().pow(beta)


def distill_losses(
    teacher: InstanceTeacher,
    student: Student,
    clean: Tensor,
    augmented: Tensor,
    w1: float = 0.5,
    w2: float = 0.5,
    beta: float | None = None,
) -> dict[str, Tensor]:
    """loss_c, loss_w1, loss_w2 and their weighted total for one batch (normalised NCHW views).
    `beta`: weight loss_c per tile by the teacher's confidence (journal version); None: unweighted."""
    with torch.no_grad():
        f_t = teacher.encoder(clean)
        m_t = teacher.reduction(f_t)
        log_p_t = F.log_softmax(teacher.logits(m_t).float(), dim=-1)
        weights = confidence_weights(teacher.confidence(m_t), beta) if beta is not None else None
    s_aug = student.head(student.reduction(student.encoder(augmented)))
    m_s = student.reduction(f_t)
    s_clean = student.head(m_s)
    loss_c = _kl(log_p_t, F.log_softmax(s_aug.float(), dim=-1), weights)
    loss_w1 = _kl(log_p_t, F.log_softmax(s_clean.float(), dim=-1))
    loss_w2 = _kl(F.log_softmax(m_t.float(), dim=-1), F.log_softmax(m_s.float(), dim=-1))
    total = loss_c + w1 * loss_w1 + w2 * loss_w2
    return {"loss": total, "loss_c": loss_c, "loss_w1": loss_w1, "loss_w2": loss_w2}


def augmented_view(x: Tensor, size: int, scale_min: float, generator: torch.Generator) -> Tensor:
    """The student's view of [0, 1] tiles (N, 3, H, W): per tile a random resized crop (area scale in
    [scale_min, 1], aspect ratio in [3/4, 4/3], log-uniform) to size × size, then random h/v flips."""
    n, _, h, w = x.shape
    out = []
    u = torch.rand(n, 5, generator=generator).tolist()
    for i in range(n):
        area = h * w * (scale_min + (1 - scale_min) * u[i][0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[i][1])
        cw = max(1, min(w, round(math.sqrt(area * ratio))))
        ch = max(1, min(h, round(math.sqrt(area / ratio))))
        top = int(u[i][2] * (h - ch + 1))
        left = int(u[i][3] * (w - cw + 1))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        flips = [d for d, bit in ((-1, u[i][4] < 0.5), (-2, (u[i][4] * 2) % 1 < 0.5)) if bit]
        out.append(crop.flip(flips) if flips else crop)
    return torch.cat(out).clamp_(0.0, 1.0)
