"""Small-cohort MIL protocol benchmark: how the kept epoch is chosen, against the pooled LR baseline.

Per seed, a synthetic cohort of feature bags (`slidestream.testing.bags.write_bags`: background instances,
a few "witness" instances in each positive bag; `--label-noise` of the labels flipped, as real cohorts
carry some) is trained with ABMIL by the real trainer (`Run`, Ray Train in-process workers) under each
selection option, on the same fold plan (stratified k-fold, a validation part carved from each training
part). Every run also fits the mean+max-pooled logistic regression on the same folds (`pooled_lr` in its
metrics). Options:

- `loss`: early_stop on val_loss, every epoch eligible (the default before issue 21);
- `loss+min`: early_stop on val_loss, no epoch before `--min-epochs` kept;
- `auc+min`: early_stop on val_auc, no epoch before `--min-epochs` kept;
- `fixed`: fixed_epochs, every epoch trained, the last kept (the papers' protocol);
- `inner×R`: `auc+min` on R validation parts carved differently from each training part (inner repeats),
  test probabilities averaged over the R models, the threshold the mean of theirs (R× the cost);
- `paper`: the whole MHIM-MIL `paper` recipe (200 epochs, val_auc, patience 30 from epoch 132, any
  epoch kept, raw features; the validation fraction kept at 0.2 so the parts are the same), to set
  against `loss+min` (our defaults) at `--epochs 50`.

Printed: per option, mean ± std over every (seed, fold) test part of AUC, accuracy at the validation
threshold and at 0.5, the mean kept epoch and the AUC difference to the first option paired by test part;
the LR baseline on the same test parts (the runs' C, and
each `--lr-c`: its strength is fixed, not chosen on the validation part).

    python bench/mil_protocol.py [--seeds 0 1 2 3] [--slides 60] [--folds 3] [--epochs 30] [--min-epochs 10]
                                 [--dim 16] [--instances 10 40] [--witness-frac 0.2] [--label-noise 0.1]
                                 [--repeats 2] [--options loss loss+min auc+min fixed inner paper]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from slidestream.cluster.config import TrainConfig
from slidestream.testing.bags import write_bags
from slidestream.testing.helpers import make_config
from slidestream.trainers.data import LabelledBags
from slidestream.trainers.metrics import classification_metrics
from slidestream.trainers.mil.pooled_baseline import POOLED_C, pooled_baseline
from slidestream.trainers.mil.runner import Run
from slidestream.trainers.splits import FoldSplit, carve_val, make_splits

OPTIONS = {
    "loss": ("train.selection=early_stop", "train.monitor=val_loss", "train.min_epochs=0"),
    "loss+min": ("train.selection=early_stop", "train.monitor=val_loss"),
    "auc+min": ("train.selection=early_stop", "train.monitor=val_auc"),
    "fixed": ("train.selection=fixed_epochs",),
    "inner": ("train.selection=early_stop", "train.monitor=val_auc"),
    # the MHIM-MIL paper recipe (200 epochs, its own min_epochs) against our defaults at --epochs; the
    # validation part stays the default 0.2 so every option trains and tests on the same parts
    "paper": ("train.recipe=paper", "train.epochs=200", "train.min_epochs=132", "train.val_frac=0.2"),
}
KEYS = ("auc", "acc", "acc_at_0.5")


def cohort(root: str, args: argparse.Namespace, seed: int) -> tuple[str, str]:
    """A feature-bag directory and its labels file, with `label_noise` of the labels flipped."""
    labels = write_bags(
        root, n_slides=args.slides, dim=args.dim, n_instances=tuple(args.instances), seed=seed,
        witness_frac=args.witness_frac,
    )  # fmt: skip
    table = pd.read_csv(labels)
    rng = np.random.default_rng(seed + 10_000)
    flip = rng.choice(len(table), size=round(args.label_noise * len(table)), replace=False)
    table.loc[flip, "label"] = table.loc[flip, "label"].map({"normal": "tumor", "tumor": "normal"})
    table.to_csv(labels, index=False)
    return os.path.join(root, "features"), labels


def inner_splits(run: Run, repeats: int, val_frac: float) -> list[FoldSplit]:
    """R copies of each outer split, same test part, the validation part carved with another seed; the
    copy's fold number is outer_fold · R + r (job names stay unique)."""
    out = []
    for split in run.splits:
        rest = [*split.train, *split.val]
        index = np.asarray([run.data.slide_ids.index(s) for s in rest])
        for r in range(repeats):
            carved = carve_val(run.data, index, val_frac, split.seed * 1000 + r, split.fold)
            val = [run.data.slide_ids[i] for i in carved]
            train = [s for s in rest if s not in set(val)]
            out.append(replace(split, fold=split.fold * repeats + r, train=train, val=val))
    return out


def ensemble_rows(run_dir: str, repeats: int, classes: list[str]) -> list[dict[str, float]]:
    """Per outer fold: the R inner models' test probabilities averaged, at the mean of their thresholds."""
    predictions = pd.read_parquet(os.path.join(run_dir, "predictions.parquet"))
    metrics = json.loads(Path(run_dir, "metrics.json").read_text())
    thresholds: dict[int, list[float]] = defaultdict(list)
    epochs: dict[int, list[int]] = defaultdict(list)
    for row in metrics["folds"]:
        thresholds[row["fold"] // repeats].append(row["threshold"])
        epochs[row["fold"] // repeats].append(row["best_epoch"])
    predictions["outer"] = predictions.fold // repeats
    rows = []
    for outer, part in predictions.groupby("outer"):
        mean = part.groupby("slide_id")[[f"prob_{c}" for c in classes]].mean()
        label = part.groupby("slide_id").label.first().map({c: i for i, c in enumerate(classes)})
        m = classification_metrics(
            label.to_numpy(), mean.to_numpy(), classes, float(np.mean(thresholds[outer]))
        )
        rows.append({**m, "best_epoch": float(np.mean(epochs[outer]))})
    return rows


def run_option(name: str, args: argparse.Namespace, features: str, labels: str, seed: int, out: str):
    """(model rows, LR rows, seconds) of one option on one cohort."""
    config = make_config(
        "train.workers=0", "train.parallel_folds=1", f"train.folds={args.folds}", f"train.seeds=[{seed}]",
        f"train.epochs={args.epochs}", f"train.min_epochs={args.min_epochs}", *OPTIONS[name],
    )  # fmt: skip
    started = time.perf_counter()
    run = Run("mil", f"{name}-s{seed}", out, features, labels, config)
    outer = run.splits
    if name == "inner":
        run.splits = inner_splits(run, args.repeats, config.train.val_frac)
    metrics = run.execute().metrics
    seconds = time.perf_counter() - started
    rows = ensemble_rows(run.run_dir, args.repeats, run.data.classes) if name == "inner" else metrics["folds"]
    lr = metrics["pooled_lr"]["folds"]
    if name == "inner":  # the LR baseline on the outer splits, as every other option's
        lr = pooled_baseline(run.data, outer)["folds"]
    return rows, lr, seconds


def lr_grid(features: str, labels: str, args: argparse.Namespace, seed: int) -> dict[float, list[dict]]:
    """The pooled LR baseline at each `--lr-c` on the runs' fold plan (a pure function of data and seed)."""
    data = LabelledBags.open(features, labels)
    splits = make_splits(data, args.folds, [seed], TrainConfig().val_frac)
    return {c: pooled_baseline(data, splits, c)["folds"] for c in args.lr_c}


def summary(rows: list[dict], reference: list[dict] | None = None) -> str:
    """Mean ± std of the metrics and the kept epoch; with `reference` (the first option, on the same test
    parts in the same order) also the paired AUC difference to it."""
    cells = []
    for key in (*KEYS, "best_epoch"):
        values = np.asarray([r[key] for r in rows if key in r], dtype=float)
        cells.append(f"{values.mean():.3f} ± {values.std():.3f}" if len(values) else "—")
    diff = [r["auc"] - b["auc"] for r, b in zip(rows, reference, strict=True)] if reference else []
    cells.append(f"{np.mean(diff):+.3f} ± {np.std(diff):.3f}" if diff else "—")
    return " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--slides", type=int, default=60)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--min-epochs", type=int, default=10)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--instances", type=int, nargs=2, default=[10, 40])
    parser.add_argument("--witness-frac", type=float, default=0.2)
    parser.add_argument("--label-noise", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--options", nargs="*", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--lr-c", type=float, nargs="*", default=[0.01, 0.1, 1.0, 10.0])
    args = parser.parse_args()
    logging.getLogger("ray").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # as the trainer's Ray workers with cpus_per_worker=1
    os.environ.setdefault("SLIDESTREAM_PROGRESS", "0")

    model: dict[str, list[dict]] = defaultdict(list)
    lr_rows: dict[tuple[int, int], dict] = {}
    seconds: dict[str, float] = defaultdict(float)
    lr_by_c: dict[float, list[dict]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="mil-protocol-") as tmp:
        for seed in args.seeds:
            features, labels = cohort(os.path.join(tmp, f"cohort-{seed}"), args, seed)
            for c, rows in lr_grid(features, labels, args, seed).items():
                lr_by_c[c] += rows
            for name in args.options:
                rows, lr, took = run_option(name, args, features, labels, seed, os.path.join(tmp, "out"))
                model[name] += rows
                seconds[name] += took
                for row in lr:  # every option's folds are the same: so is its LR baseline
                    key = (row["seed"], row["fold"])
                    assert lr_rows.setdefault(key, row)["auc"] == row["auc"], key
                print(f"seed {seed} {name:<9} {summary(rows)}  ({took:.0f} s)", flush=True)
    print(
        f"\n{args.slides} bags, {args.folds} folds × seeds {args.seeds}, ABMIL {args.epochs} epochs, "
        f"min_epochs {args.min_epochs}, label noise {args.label_noise}; mean ± std over (seed, fold)\n"
    )
    first = model[args.options[0]] if args.options else None
    paired = f"ΔAUC vs {args.options[0]}" if args.options else "—"
    print(f"| option | test AUC | acc (val threshold) | acc at 0.5 | kept epoch | {paired} | s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.options:
        label = f"inner×{args.repeats}" if name == "inner" else name
        print(f"| {label} | {summary(model[name], first)} | {seconds[name]:.0f} |")
    if lr_rows:
        rows = list(lr_rows.values())
        print(f"| mean+max LR (C={POOLED_C}, as in every run) | {summary(rows, first)} | — |")
    for c, rows in lr_by_c.items():
        print(f"| mean+max LR, C={c} | {summary(rows, first)} | — |")


if __name__ == "__main__":
    main()
