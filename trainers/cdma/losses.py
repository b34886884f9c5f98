"""CDMA losses: supervised Dice + CE on the labelled half, cross-decoder distillation and the entropy of
the mean prediction on every image; the two unsupervised terms count from `start_epoch` on (no ramp)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CDMALoss",
    "cross_decoder_distillation",
    "dice_loss",
    "distillation",
    "mean_entropy",
    "supervised_loss",
]

_SMOOTH = 1e-5
_LOG_EPS = 1e-6


def dice_loss(probs: Tensor, target: Tensor, classes: Sequence[int] | None = None) -> Tensor:
    """Mean over classes of 1 − (2Σp·t + ε)/(Σp² + Σt² + ε), sums over every pixel of the batch jointly.

    `probs` (B, C, H, W) softmax output, `target` (B, H, W) class indices."""
    n_classes = probs.shape[1]
    onehot = F.one_hot(target.long(), n_classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = (probs * probs).sum(dims) + (onehot * onehot).sum(dims)
    per_class = 1 - (2 * inter + _SMOOTH) / (denom + _SMOOTH)
    if classes is not None:
        per_class = per_class[list(classes)]
    return per_class.mean()


def supervised_loss(logits: Sequence[Tensor], target: Tensor) -> Tensor:
    """0.5·Dice + 0.5·CE per decoder, averaged over the decoders (labelled images only)."""
    total = cast(
        Tensor,
        sum(  # of one or more tensors
            0.5 * dice_loss(torch.softmax(z, dim=1), target) + 0.5 * F.cross_entropy(z, target.long())
            for z in logits
        ),
    )
    return total / len(logits)


def _pixel_rows(z: Tensor) -> Tensor:
    """(B, C, H, W) → (B·H·W, C): one row per pixel, so "batchmean" averages over pixels."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def distillation(student: Tensor, teacher: Tensor, temperature: float = 10.0) -> Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T))·T², teacher detached, mean over pixel rows."""
    s = F.log_softmax(_pixel_rows(student) / temperature, dim=1)
    t = F.softmax(_pixel_rows(teacher.detach()) / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean") * temperature**2


def cross_decoder_distillation(logits: Sequence[Tensor], temperature: float = 10.0) -> Tensor:
    """Every decoder distilled from every other (ordered pairs), summed and divided by the decoder count."""
    terms = [
        distillation(student, teacher, temperature)
        for k, student in enumerate(logits)
        for j, teacher in enumerate(logits)
        if j != k
    ]
    return cast(Tensor, sum(terms)) / len(logits)


def mean_entropy(logits: Sequence[Tensor]) -> Tensor:
    """Pixel-mean entropy (bits) of the decoders' mean softmax."""
    mean = torch.stack([torch.softmax(z, dim=1) for z in logits]).mean(dim=0)
    entropy = -(mean * torch.log(mean + _LOG_EPS)).sum(dim=1) / math.log(2)
    return entropy.mean()


@dataclass(frozen=True)
class CDMALoss:
    """The total loss. `n_labelled` first images of the batch carry targets; the rest are unlabelled."""

    kd_weight: float = 0.1
    entropy_weight: float = 0.1
    start_epoch: int = 15
    temperature: float = 10.0
    semi_supervised: bool = True  # False: the supervised-only comparison (no unsupervised terms at all)

    def uses_unlabelled(self, epoch: int) -> bool:
        """Whether the unsupervised terms, the only ones that read the unlabelled images, count at `epoch`."""
        return self.semi_supervised and epoch >= self.start_epoch

    def __call__(
        self, logits: Sequence[Tensor], target: Tensor, n_labelled: int, epoch: int
    ) -> tuple[Tensor, dict[str, float]]:
        sup = supervised_loss([z[:n_labelled] for z in logits], target[:n_labelled])
        parts = {"sup": float(sup.detach())}
        if not self.uses_unlabelled(epoch):
            return sup, parts
        kd = cross_decoder_distillation(logits, self.temperature)
        ent = mean_entropy(logits)
        parts.update(kd=float(kd.detach()), ent=float(ent.detach()))
        return sup + self.kd_weight * kd + self.entropy_weight * ent, parts
