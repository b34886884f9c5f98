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
    meta = BagMeta(encoder="synthetic", dim=dim, mpp=0.5, tile_px=256, code_version="test")
    features_dir = os.path.join(root, "features")
    rows = ["slide_id,label" + (",patient_id" if patients else "")]
    for i in range(n_slides):
        label = i % len(classes)
        n = int(rng.integers(n_instances[0], n_instances[1] + 1))
        features = rng.normal(size=(n, dim)).astype(np.float32)
        if label > 0:
            k = max(1, round(witness_frac * n))
            features[rng.choice(n, size=k, replace=False)] += 3.0 * directions[label]
        side = int(np.ceil(np.sqrt(n)))
        x = (np.arange(n) % side) * 256
        y = (np.arange(n) // side) * 256
        slide_id = f"slide-{i:03d}"
        write_bag(
            os.path.join(features_dir, f"{slide_id}.parquet"),
            bag_table(x, y, features, meta, dtype="float32"),
        )
        rows.append(f"{slide_id},{classes[label]}" + (f",patient-{i // 2:03d}" if patients else ""))
    labels = os.path.join(root, "labels.csv")
    with open(labels, "w") as handle:
        handle.write("\n".join(rows) + "\n")
    return labels
