"""Published recipes: `<section>.recipe: paper` sets a method's whole published recipe in one switch.

`PAPER_RECIPES` maps a section that has a `recipe` key to the settings of its paper, as dotted keys from
the top of the configuration. `load_config` applies them between the config file and the `--set`
overrides, and only to keys the file leaves at their defaults: a setting you changed (in the file or with
`--set`) stays yours, and a saved run config (which records `recipe: paper` with the values it resolved)
loads to the same values again. `docs/methods.md` lists, per method, every difference between `default`
and `paper` and why our default differs.
"""

from __future__ import annotations

from typing import Any, Literal

Recipe = Literal["default", "paper"]

# section -> {dotted key from the top of the config: the paper's value}. Each method's tests pin its row.
PAPER_RECIPES: dict[str, dict[str, Any]] = {
    "train": {},
    "icmil": {},
    "cdma": {},
    "gigassl": {  # the released model: epoch 1000 of a 3000-epoch warm-up + cosine schedule
        "gigassl.epochs": 1000,
        "gigassl.schedule_epochs": 3000,
        "gigassl.warmup_epochs": 10,
        "gigassl.batch_size": 256,
        "gigassl.lr": None,  # 0.03 × batch_size / 256
        "gigassl.optimizer": "adam",
        "gigassl.weight_decay": 0.0,
        "gigassl.n_tiles": 5,
        "gigassl.tau": 0.05,
        "gigassl.cell_px": 224.0,
        "gigassl.dim": 512,
        "gigassl.proj_dim": 256,
        "gigassl.export_bn": "running",
    },
}


def recipe_values(sections: dict[str, str]) -> dict[str, Any]:
    """The settings of the recipes named per section (`{"cdma": "paper", ...}`), later sections first-come."""
    values: dict[str, Any] = {}
    for section, recipe in sections.items():
        if recipe == "paper":
            for key, value in PAPER_RECIPES.get(section, {}).items():
                values.setdefault(key, value)
    return values
