"""`icmil.recipe: paper`: the row is the official ICMIL recipe key by key, `load_config` resolves to it, a
setting of your own still wins, and what it names really exists (constant LR, bias-free reduction)."""

from __future__ import annotations

import pytest
import torch

from slidestream.cluster.config import load_config
from slidestream.cluster.recipes import PAPER_RECIPES
from slidestream.trainers.mil.loop import lr_scheduler
from slidestream.trainers.models import build_model

# The official code (main branch): step1_train_classifier_abmil.py and step2_teacher_student_*.py.
OFFICIAL = {
    "train.model": "abmil",
    "train.model_options": {"gated": True, "dropout": 0.0, "embed_bias": False},  # DimReduction: no bias
    "train.epochs": 200,
    "train.lr": 2e-4,
    "train.lr_schedule": "constant",  # step 1 has no scheduler
    "train.weight_decay": 1e-4,
    "train.grad_clip": 5.0,
    "train.monitor": "val_auc",  # keeps the best validation AUC
    "train.patience": 200,  # runs all 200 epochs
    "train.keep_early_epochs": True,  # the best of all 200, the first ones included
    "train.standardize": False,  # raw features
    "icmil.epochs": 200,
    "icmil.tiles_per_epoch": None,
    "icmil.batch_size": 100,
    "icmil.lr": 1e-5,
    "icmil.weight_decay": 1e-4,
    "icmil.clip": 5.0,
    "icmil.weight_w1": 0.5,
    "icmil.weight_w2": 0.5,
    "icmil.crop_scale_min": 0.5,
    "icmil.confidence": False,  # the MICCAI version; the journal's confidence branch is opt-in
    "icmil.lr_milestones": [],
}


def _dotted(values: dict, key: str) -> object:
    for part in key.split("."):
        values = values[part]
    return values


def test_paper_row_is_the_official_recipe_and_load_config_resolves_to_it():
    assert PAPER_RECIPES["icmil"] == OFFICIAL
    paper = load_config(None, ["icmil.recipe=paper"])
    dumped = paper.model_dump(mode="json")
    for key, value in OFFICIAL.items():
        assert _dotted(dumped, key) == value, key
    default = load_config(None, []).model_dump(mode="json")
    assert [k for k in OFFICIAL if _dotted(default, k) != OFFICIAL[k]], "the row changes nothing"
    # A setting of your own wins over the recipe, even one that names the default value.
    mine = load_config(None, ["icmil.recipe=paper", "icmil.epochs=1", "train.lr_schedule=cosine"])
    assert mine.icmil.epochs == 1 and mine.train.lr_schedule == "cosine" and mine.train.epochs == 200
    # The recipe's model options build the model they describe: no bias on the reduction layer.
    model = build_model(paper.train.model, 16, 2, **paper.train.model_options)
    assert model.embed[0].bias is None and model.gated and model.embed[2].p == 0.0
    paper.train.model_options["gated"] = False
    assert PAPER_RECIPES["icmil"]["train.model_options"]["gated"] is True  # configs do not share the row


@pytest.mark.parametrize(("schedule", "after"), [("constant", 2e-4), ("cosine", 0.0)])
def test_mil_lr_schedule(schedule, after):
    """`train.lr_schedule`: constant keeps the learning rate every epoch; cosine anneals it to 0."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    scheduler = lr_scheduler(optimizer, schedule, epochs=4)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(after, abs=1e-12)
