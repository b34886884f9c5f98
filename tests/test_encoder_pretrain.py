"""The pretrained tile encoder: `slidestream pretrain-encoder` writes a plain weights file that the
named encoder `resnet10t_64` loads, and its features find tumour on slides it never saw, under the
Giga-SSL view augmentations, where a random network's features do much worse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from slidestream.cli import main
from slidestream.pipelines.encoders import build_encoder, encoder_info, weights_digest
from slidestream.pipelines.gigassl_views import apply_view, draw_params
from slidestream.pipelines.synthetic import cohort_specs, sample_tiles
from slidestream.trainers.models.mtnet import build_mtnet


def _unseen_tiles() -> tuple[np.ndarray, np.ndarray]:
    """Augmented tiles of 6 hard slides of another cohort (seed 77): clearly tumour or clearly normal."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for index, slide in enumerate(cohort_specs(6, seed=77, difficulty="hard", tumour_cover=(0.1, 0.3))):
        tiles = sample_tiles(slide.spec, 40, 64, 2.0, seed=index, tumour_share=0.5)
        clear = (tiles.tumour_fraction >= 0.5) | (tiles.tumour_fraction == 0)
        for start in range(0, int(clear.sum()), 8):  # one view augmentation per 8 tiles
            images.append(apply_view(tiles.images[clear][start : start + 8], draw_params(rng), 64))
        labels.append(tiles.tumour_fraction[clear] >= 0.5)
    return np.concatenate(images), np.concatenate(labels)


def _probe_auc(features: np.ndarray, labels: np.ndarray) -> float:
    probe = LogisticRegression(C=1.0, max_iter=2000)
    scores = cross_val_predict(probe, features, labels, cv=5, method="decision_function")
    return float(roc_auc_score(labels, scores))


def test_pretrained_features_find_tumour_on_unseen_slides(pretrained_weights: Path):
    record = json.loads(pretrained_weights.with_name(pretrained_weights.name + ".json").read_text())
    assert record["history"][-1]["held_out_auc"] >= 0.85, record["history"]
    tiles, labels = _unseen_tiles()
    assert 0.2 < labels.mean() < 0.8
    auc = {}
    for weights in (str(pretrained_weights), "random"):
        encoder = build_encoder("resnet10t_64", weights)
        auc[weights == "random"] = _probe_auc(encoder.embed(tiles), labels)
    print(f"\ntumour probe on unseen augmented tiles: pretrained {auc[False]:.3f}, random {auc[True]:.3f}")
    assert auc[False] >= 0.8 and auc[False] > auc[True] + 0.1, auc  # measured 0.837 vs 0.650


def test_weights_load_as_the_named_encoder(pretrained_weights: Path):
    encoder = build_encoder("resnet10t_64", pretrained_weights)
    assert encoder.info.key == f"resnet10t_64-{weights_digest(pretrained_weights)}"
    assert (encoder.info.dim, encoder.info.input_px) == (512, 64)
    state = torch.load(pretrained_weights, weights_only=True)
    assert not any(key.startswith(("fc.", "head")) for key in state)  # the backbone alone
    tiles = np.random.default_rng(0).integers(0, 255, (3, 128, 128, 3), dtype=np.uint8)
    assert encoder.embed(tiles).shape == (3, 512)  # larger tiles are resized to the native 64 px
    record = json.loads(pretrained_weights.with_name(pretrained_weights.name + ".json").read_text())
    assert record["key"] == encoder.info.key and record["settings"]["seed"] == 1000


def test_timm_feature_width_is_what_the_model_outputs():
    """MobileNetV3 ends in a 1024-wide hidden layer after its 576 `num_features`."""
    info = encoder_info("timm:mobilenetv3_small_050", "random")
    encoder = build_encoder("timm:mobilenetv3_small_050", "random")
    tiles = np.zeros((2, info.input_px, info.input_px, 3), np.uint8)
    assert info.dim == encoder.embed(tiles).shape[1] == 1024


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--slides", "2"], "at least 4 slides, not 2"),
        (["--tiles-per-slide", "4"], "≥ 8 tiles per slide"),
        (["--contrastive", "-1"], "contrastive weight must be ≥ 0"),
    ],
)
def test_settings_that_cannot_train_are_refused(tmp_path: Path, capsys, flags: list[str], message: str):
    assert main(["pretrain-encoder", "--out", str(tmp_path / "w.pt"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "w.pt").exists()


def test_resnet18_64_pretrains_into_the_light_cdma_encoder(tmp_path: Path, capsys):
    """`--encoder resnet18_64` trains the architecture of the light CDMA network's encoder: the file is
    both a tile encoder and `cdma.weights` (every encoder tensor taken from it)."""
    out = tmp_path / "r18.pt"
    flags = ["--slides", "4", "--tiles-per-slide", "8", "--epochs", "1"]
    assert main(["pretrain-encoder", "--out", str(out), "--encoder", "resnet18_64", *flags]) == 0
    assert "cdma.weights=" in capsys.readouterr().out
    encoder = build_encoder("resnet18_64", out)
    assert (encoder.info.dim, encoder.info.input_px) == (512, 64)
    state = torch.load(out, weights_only=True)
    network = build_mtnet(2, "light", out)
    loaded = network.encoder.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_contrastive_term_is_trained_and_recorded(tmp_path: Path):
    """`--contrastive W` trains the NT-Xent term beside the supervised one; its loss is in the record."""
    out = tmp_path / "c.pt"
    flags = ["--slides", "4", "--tiles-per-slide", "8", "--epochs", "2", "--contrastive", "1"]
    assert main(["pretrain-encoder", "--out", str(out), *flags]) == 0
    history = json.loads(out.with_name(out.name + ".json").read_text())["history"]
    ntxent = [epoch["ntxent"] for epoch in history]
    assert len(ntxent) == 2 and all(np.isfinite(ntxent)) and min(ntxent) > 0, history
    state = torch.load(out, weights_only=True)
    assert set(state) == set(build_encoder("resnet10t_64", "random").model.state_dict())  # no projector
