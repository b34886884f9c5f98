"""How much slide identity do Giga-SSL's views carry? A check of the data before training on it.

Giga-SSL's pretext task is to tell, from T tiles of a slide, which slide it is (NT-Xent: two views of a
slide against the other slides' views). If two views of the same slide are not more alike than views of
different slides, the task has nothing to learn from. This measures it without any training: per trial,
two views of every slide are drawn as training draws them (T tiles of one stored augmentation, with
replacement; for view bags also from two different augmentations), mean-pooled over standardised
features, and each first view is matched to the nearest second view by cosine similarity. Accuracy = how
often that is the same slide (chance 1/slides).

    python bench/gigassl_signal.py OUT/gigassl/<key> [OUT/features/<key> ...] [--tiles 5,16,64]
    python bench/gigassl_signal.py --cohort 24 [--work DIR] [--tiles 5,16,64] [--contrastive W]
    python bench/gigassl_signal.py --cohort 24 --in-memory WEIGHTS [WEIGHTS ...]

`--cohort N`: no bags given, the benchmark makes its own: N tiny HARD synthetic slides (seed `--seed`,
3 sites, default tumour cover) through our pipeline (64-px tiles at 2 µm/px) with the pretrained
`resnet10t_64` (`pretrained_encoder(WORK, PretrainSettings())`, trained on a disjoint cohort) and the same
network at random weights, 8 augmentations × 32 tiles each; both view sets are measured side by side.
`--contrastive W` pretrains with that weight of the tile-level NT-Xent term (default 0: supervised only);
a weight other than 0 gets a cohort directory of its own.

`--in-memory WEIGHTS…`: a cheaper stand-in for the pipeline (no Ray, no slide files, no training) to
compare pretrained `resnet10t_64` weights files: the same N hard slides' specs (seed `--seed`, default
tumour cover), 100 tissue tiles per slide drawn from the generator (`sample_tiles`, 64 px at 2 µm/px), and
per slide 8 augmentations × 32 of them (with replacement, one `draw_params` per augmentation, generator
seeded with `--seed`), each embedded by every weights file given ("random" for random weights).
`--ablate` (with `--in-memory`): the views again with only some of the augmentations kept (each at its
official probability and range; the same parameter draws and tiles in every row), to see which one erases
slide identity.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from slidestream.pipelines.features import Bag, FeatureBags
from slidestream.pipelines.gigassl_views import ViewParams

_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
_NO_JITTER = (1.0, 1.0, 1.0, 0.0)  # the factors and hue shift that leave a tile as it is


def keep_only(
    params: ViewParams,
    crop: bool = False,
    jitter: tuple[int, ...] = (),
    grey: bool = False,
    blur: bool = False,
) -> ViewParams:
    """`params` with only the named augmentations left (`jitter`: the colour jitter factors kept)."""
    colour = None
    if params.jitter is not None and jitter:
        b, c, s, h = (v if i in jitter else _NO_JITTER[i] for i, v in enumerate(params.jitter))
        colour = (b, c, s, h)
    return replace(
        params,
        crop=params.crop if crop else (0.0, 0.0, 1.0, 1.0),
        jitter=colour,
        grayscale=grey and params.grayscale,
        blur_sigma=params.blur_sigma if blur else None,
    )


_EVERY_JITTER_FACTOR = (_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE)
ABLATIONS: dict[str, Callable[[ViewParams], ViewParams]] = {
    "none": keep_only,
    "crop": lambda p: keep_only(p, crop=True),
    "brightness": lambda p: keep_only(p, jitter=(_BRIGHTNESS,)),
    "contrast": lambda p: keep_only(p, jitter=(_CONTRAST,)),
    "saturation": lambda p: keep_only(p, jitter=(_SATURATION,)),
    "hue": lambda p: keep_only(p, jitter=(_HUE,)),
    "colour jitter": lambda p: keep_only(p, jitter=_EVERY_JITTER_FACTOR),
    "grey": lambda p: keep_only(p, grey=True),
    "blur": lambda p: keep_only(p, blur=True),
    "all but colour jitter": lambda p: keep_only(p, crop=True, grey=True, blur=True),
    "all (official)": lambda p: p,
}


def _mean_view(
    bag: Bag, features: torch.Tensor, n_tiles: int, rng: np.random.Generator, avoid: int | None = None
) -> tuple[int, np.ndarray]:
    """A view as training draws it (T tiles of one stored augmentation, with replacement), mean-pooled;
    `avoid`: an augmentation not to draw from. Returns the augmentation and the pooled features."""
    if bag.aug is None:
        aug, rows = -1, np.arange(len(features))
    else:
        augs = bag.aug.numpy()
        aug = int(rng.choice([a for a in np.unique(augs) if a != avoid]))
        rows = np.flatnonzero(augs == aug)
    return aug, features[rows[rng.integers(0, len(rows), size=n_tiles)]].mean(0).numpy()


def identification_accuracy(
    bags: list[Bag], n_tiles: int, trials: int, seed: int, across_augmentations: bool = False
) -> float:
    """Share of first views whose nearest second view (cosine) is of the same slide; with
    `across_augmentations` the two views of a slide come from different stored augmentations."""
    every = torch.cat([b.features.float() for b in bags])
    mean, std = every.mean(0), every.std(0) + 1e-6
    standard = [(b.features.float() - mean) / std for b in bags]
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        first, second = [], []
        for bag, features in zip(bags, standard, strict=True):
            aug, pooled = _mean_view(bag, features, n_tiles, rng)
            first.append(pooled)
            second.append(_mean_view(bag, features, n_tiles, rng, aug if across_augmentations else None)[1])
        a, b = np.stack(first), np.stack(second)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        hits += int((np.argmax(a @ b.T, axis=1) == np.arange(len(bags))).sum())
    return hits / (trials * len(bags))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bags", nargs="*", help="Giga-SSL view bags or feature bags (local or s3://)")
    parser.add_argument("--cohort", type=int, help="make a hard cohort of this many slides (no bags given)")
    parser.add_argument("--work", help="--cohort: work directory (kept; default a temporary one)")
    parser.add_argument("--tiles", default="5,16,64", help="T values, comma-separated")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contrastive", type=float, help="--cohort: the encoder's NT-Xent weight")
    parser.add_argument("--in-memory", nargs="+", metavar="WEIGHTS", help="--cohort: views made in memory")
    parser.add_argument("--ablate", action="store_true", help="--in-memory: one row per augmentation kept")
    args = parser.parse_args()
    sizes = [int(t) for t in args.tiles.split(",")]
    if bool(args.bags) == bool(args.cohort):
        parser.error("give view bags or --cohort N, not both")
    if args.in_memory:
        if not args.cohort:
            parser.error("--in-memory needs --cohort N")
        ablations = ABLATIONS if args.ablate else {"all (official)": ABLATIONS["all (official)"]}
        for name, keep in ablations.items():
            print(f"\naugmentations: {name}")
            table_of_bags(in_memory_views(args.cohort, args.seed, args.in_memory, keep), sizes, args)
        return
    if args.ablate:
        parser.error("--ablate needs --in-memory")
    with tempfile.TemporaryDirectory(prefix="bench-gigassl-signal-") as tmp:
        work = Path(args.work or tmp)
        named = made_cohort(work, args.cohort, args.seed, args.contrastive) if args.cohort else {
            uri.rstrip("/").rsplit("/", 1)[-1]: uri for uri in args.bags}  # fmt: skip
        table(named, sizes, args)


def made_cohort(work: Path, n_slides: int, seed: int, contrastive: float | None = None) -> dict[str, str]:
    """View bags of a hard cohort from the pretrained encoder (`contrastive`: its NT-Xent weight, default
    the pretraining's) and from its random-weight twin."""
    from slidestream.testing.cohort import embedded_cohort
    from slidestream.testing.encoder import pretrained_encoder
    from slidestream.trainers.encoder_pretrain import PretrainSettings

    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    settings = PretrainSettings() if contrastive is None else PretrainSettings(contrastive=contrastive)
    weights = pretrained_encoder(work, settings)
    print(f"pretrained encoder {weights.name}: {time.perf_counter() - started:.0f} s", flush=True)
    started = time.perf_counter()
    ssl = f"-c{settings.contrastive:g}" if settings.contrastive else ""
    cohort = embedded_cohort(
        work / f"cohort{n_slides}-seed{seed}{ssl}", n_slides, weights, seed, random_too=True
    )
    print(f"cohort of {n_slides} hard slides → features and views: {time.perf_counter() - started:.0f} s")
    weight = f"NT-Xent {settings.contrastive:g}"
    return {f"resnet10t_64 {name}" + (f" ({weight})" if name == "pretrained" else ""): uri
            for name, uri in cohort.views.items()}  # fmt: skip


def in_memory_views(
    n_slides: int, seed: int, weights: list[str], keep: Callable[[ViewParams], ViewParams]
) -> dict[str, list[Bag]]:
    """View bags (8 augmentations × 32 tiles per slide) made in memory, per weights file; `keep` edits each
    augmentation's parameter draw."""
    from slidestream.pipelines.encoders import build_encoder
    from slidestream.pipelines.gigassl_views import apply_view, draw_params
    from slidestream.pipelines.synthetic import cohort_specs, sample_tiles

    torch.set_num_threads(1)
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    views = []
    for index, slide in enumerate(cohort_specs(n_slides, seed=seed, difficulty="hard")):
        tiles = sample_tiles(slide.spec, 100, 64, 2.0, seed=index).images
        drawn = [(tiles[rng.integers(0, len(tiles), 32)], keep(draw_params(rng))) for _ in range(8)]
        views.append(np.concatenate([apply_view(sample, params, 64) for sample, params in drawn]))
    print(f"{n_slides} hard slides → views in memory: {time.perf_counter() - started:.0f} s", flush=True)
    aug = torch.arange(8, dtype=torch.int16).repeat_interleave(32)
    out = {}
    for source in weights:
        encoder = build_encoder("resnet10t_64", source)
        name = "random" if source == "random" else Path(source).name
        coords = torch.zeros(len(aug), 2, dtype=torch.int32)
        out[name] = [
            Bag(str(i), torch.from_numpy(encoder.embed(v)), coords, None, aug) for i, v in enumerate(views)
        ]
    return out


def table(named: dict[str, str], sizes: list[int], args: argparse.Namespace) -> None:
    table_of_bags(
        {name: list(FeatureBags(uri, require_labels=False)) for name, uri in named.items()}, sizes, args
    )


def table_of_bags(named: dict[str, list[Bag]], sizes: list[int], args: argparse.Namespace) -> None:
    print("| bags | views | slides | " + " | ".join(f"T = {t}" for t in sizes) + " | chance |")
    print("|---" * (len(sizes) + 4) + "|")
    for name, bags in named.items():
        modes = [False, True] if all(b.aug is not None and len(b.aug.unique()) > 1 for b in bags) else [False]
        for across in modes:
            scores = [identification_accuracy(bags, t, args.trials, args.seed, across) for t in sizes]
            cells = " | ".join(f"{score:.3f}" for score in scores)
            views = "different augmentations" if across else "as training draws them"
            print(f"| {name} | {views} | {len(bags)} | {cells} | {1 / len(bags):.3f} |")


if __name__ == "__main__":
    main()
