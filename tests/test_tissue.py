"""Tissue detection against the synthetic slides' ground truth: pieces found, faint tissue kept, pen ink
and glass dropped."""

from __future__ import annotations

import numpy as np

from slidestream.cluster.config import TissueConfig
from slidestream.pipelines.formats.choose import open_handle
from slidestream.pipelines.synthetic import MASK_DOWNSAMPLE, SlideSpec, write_slide
from slidestream.pipelines.tissue import tissue_mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_detected_tissue_matches_truth_with_pen_and_faint_tissue(tmp_path):
    spec = SlideSpec(8192, 6144, seed=11, pen_marks=True, faint_tissue=True, positive=True)
    truth = write_slide(tmp_path / "s.svs", spec)
    slide = open_handle(str(tmp_path / "s.svs"))
    found = tissue_mask(slide, 0.25, TissueConfig())
    assert found.downsample == MASK_DOWNSAMPLE  # 8 µm/px on a 0.25 µm/px slide
    h = min(found.mask.shape[0], truth.tissue_mask.shape[0])
    w = min(found.mask.shape[1], truth.tissue_mask.shape[1])
    detected, expected = found.mask[:h, :w], truth.tissue_mask[:h, :w]
    assert _iou(detected, expected) > 0.85
    assert detected[~expected].mean() < 0.05, "pen ink or glass taken for tissue"


def test_blank_glass_has_no_tissue(tmp_path):
    write_slide(tmp_path / "blank.svs", SlideSpec(8192, 6144, seed=12, n_pieces=0))
    found = tissue_mask(open_handle(str(tmp_path / "blank.svs")), 0.25, TissueConfig())
    assert not found.mask.any()
