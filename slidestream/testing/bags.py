"""Synthetic feature-bag directories (the MIL data contract) with a learnable signal, for trainer tests."""

from __future__ import annotations

import os

import numpy as np

from slidestream.pipelines.features import BagMeta, bag_table, write_bag


def write_bags(
    root: str,
    n_slides: int = 24,
    dim: int = 32,
    n_instances: tuple[int, int] = (20, 60),
    seed: int = 0,
    classes: tuple[str, ...] = ("normal", "tumor"),
    witness_frac: float = 0.1,
    patients: bool = False,
) -> str:
    """Bags where a slide of class c > 0 holds a few "witness" instances shifted along direction c;
    returns the labels CSV path. Class 0 bags are pure background (the MIL assumption)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(classes), dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    bags, labels = [], []
    for i in range(n_slides):
        label = i % len(classes)
        n = int(rng.integers(n_instances[0], n_instances[1] + 1))
        features = rng.normal(size=(n, dim)).astype(np.float32)
        if label > 0:
            k = max(1, round(witness_frac * n))
            features[rng.choice(n, size=k, replace=False)] += 3.0 * directions[label]
        bags.append(features)
        labels.append(classes[label])
    return _write_bag_dir(root, bags, labels, patients)


def write_order_bags(
    root: str, n_slides: int = 32, dim: int = 8, n_instances: int = 16, seed: int = 0
) -> str:
    """Bags whose label lies ONLY in the instances' order: every bag holds a ramp of instances along one
    direction (plus noise), stored ascending in "tumor" bags and descending in "normal" ones, so the set
    of instances says nothing of the class. Returns the labels CSV path."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    ramp = np.linspace(-2.0, 2.0, n_instances)
    bags, labels = [], []
    for i in range(n_slides):
        tumor = i % 2 == 1
        position = ramp if tumor else ramp[::-1]
        noise = rng.normal(scale=0.5, size=(n_instances, dim))
        bags.append((noise + position[:, None] * direction).astype(np.float32))
        labels.append("tumor" if tumor else "normal")
    return _write_bag_dir(root, bags, labels)


def with_split(labels: str, target: str, parts: list[str]) -> str:
    """A copy of a bag directory's labels (slide_id, label) with a fixed `split` column, `parts` in slide
    order (train / val / test): one training job per run instead of cross-validation folds."""
    with open(labels) as handle:
        rows = [",".join(line.split(",")[:2]) for line in handle.read().split()[1:]]
    body = "".join(f"{row},{part}\n" for row, part in zip(rows, parts, strict=True))
    with open(target, "w") as handle:
        handle.write(f"slide_id,label,split\n{body}")
    return target


def _write_bag_dir(root: str, bags: list[np.ndarray], labels: list[str], patients: bool = False) -> str:
    """`root/features/slide-NNN.parquet` (instances on a row-major grid, in the given order) and
    `root/labels.csv` (two slides per patient with `patients`); returns the labels CSV path."""
    meta = BagMeta(encoder="synthetic", dim=bags[0].shape[1], mpp=0.5, tile_px=256, code_version="test")
    features_dir = os.path.join(root, "features")
    rows = ["slide_id,label" + (",patient_id" if patients else "")]
    for i, (features, label) in enumerate(zip(bags, labels, strict=True)):
        n = len(features)
        side = int(np.ceil(np.sqrt(n)))
        x = (np.arange(n) % side) * 256
        y = (np.arange(n) // side) * 256
        slide_id = f"slide-{i:03d}"
        write_bag(
            os.path.join(features_dir, f"{slide_id}.parquet"),
            bag_table(x, y, features, meta, dtype="float32"),
        )
        rows.append(f"{slide_id},{label}" + (f",patient-{i // 2:03d}" if patients else ""))
    labels_path = os.path.join(root, "labels.csv")
    with open(labels_path, "w") as handle:
        handle.write("\n".join(rows) + "\n")
    return labels_path
