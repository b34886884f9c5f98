"""Giga-SSL settings that the official code fixes one way and slidestream offers both ways, measured on a
small synthetic cohort: linear-probe AUC of the exported embeddings (beside mean-pooled tile features) per
training variant (`--variants`,
e.g. the map cell) and per export BatchNorm mode (`running`: training's statistics, as the official
export; `recalibrate`: recomputed over the exported slides).

The cohort: `--slides` slides (half "tumour") on a 512-level-0-px tile grid (256-px tiles at 0.5 µm/px
of a 40× scan), `--dim`-d tile features. A tumour slide has a compact region whose tiles carry a small
feature shift; every stored augmentation shifts and rescales all tiles of a slide alike (one parameter
draw per augmentation, as the view stage does). Un-augmented feature bags are exported, as `train
gigassl` does when they exist. The real trainer and probe (`GigaSSLRun`, `run_probe`) run in-process
(`gigassl.workers=0`), layer4 from random init (no ImageNet file: the tile features are synthetic).

    python bench/gigassl_fidelity.py [--slides 48] [--epochs 20] [--variants "cell_px=224" "cell_px=null"]

`--few-labels N`: the issue's row "slide embeddings beat mean pooling with few labels" on a HARD cohort
made by our pipeline instead: N tiny hard synthetic slides (3 sites, default tumour cover; seed
`--cohort-seed`) → 64-px tiles at 2 µm/px → features and `--views` Giga-SSL views of the pretrained
`resnet10t_64` (`pretrained_encoder(WORK, PretrainSettings())`, a disjoint cohort). Per `--seeds` seed: a
Giga-SSL run (`gigassl.seed`), the same network untrained (`gigassl.epochs=0`, same seed), and the
mean-pooled tile features, all probed on the same splits (`seed`) at `--sizes` training slides and the
full training part; mean ± std over seeds of each seed's mean AUC over `--repeats` splits.

    python bench/gigassl_fidelity.py --few-labels 72 [--seeds 0 1 2] [--epochs 20] [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import get_args

import numpy as np

from slidestream.cluster.config import ExportBN, load_config
from slidestream.cluster.runtime import ensure_ray
from slidestream.pipelines.features import BagMeta, bag_table, write_bag
from slidestream.trainers.gigassl.probe import run_probe
from slidestream.trainers.gigassl.probe_scale import SCALES
from slidestream.trainers.gigassl.train import GigaSSLRun, export_embeddings

GRID_PX = 512


def write_cohort(root: Path, args: argparse.Namespace) -> str:
    """View bags under root/views, feature bags under root/features; returns the labels CSV path."""
    rng = np.random.default_rng(args.seed)
    meta = BagMeta("synthetic", args.dim, 0.5, 256, "bench")
    tumour_shift = rng.normal(size=args.dim) * args.signal
    rows = ["slide_id,label"]
    for i in range(args.slides):
        tumour = i % 2 == 1
        xy = rng.integers(0, args.grid, size=(args.tiles, 2))
        base = 0.5 * rng.normal(size=args.dim) + 0.5 * rng.normal(size=(args.tiles, args.dim))
        if tumour:  # a compact region of tumour tiles around a random centre
            centre = rng.integers(0, args.grid, size=2)
            region = np.abs(xy - centre).max(axis=1) <= args.grid // 4
            base[region] += tumour_shift
        write_bag(str(root / "features" / f"s{i:03d}.parquet"),
                  bag_table(xy[:, 0] * GRID_PX, xy[:, 1] * GRID_PX, base, meta, dtype="float32"))  # fmt: skip
        picks = rng.integers(0, args.tiles, size=(args.naug, args.nt))
        views = [base[p] * rng.uniform(0.7, 1.3) + rng.normal(size=args.dim) * 0.5 for p in picks]
        cells = np.concatenate([xy[p] for p in picks]) * GRID_PX
        table = bag_table(cells[:, 0], cells[:, 1], np.concatenate(views), meta,
                          aug=np.repeat(np.arange(args.naug), args.nt), dtype="float32")  # fmt: skip
        write_bag(str(root / "views" / f"s{i:03d}.parquet"), table)
        rows.append(f"s{i:03d},{'tumour' if tumour else 'normal'}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return str(labels)


def measure(variant: str, root: Path, labels: str, args: argparse.Namespace) -> dict[str, float]:
    """Probe AUC (mean over splits) per export BatchNorm mode for a run trained with `variant`."""
    settings = [
        "gigassl.workers=0", f"gigassl.epochs={args.epochs}", f"gigassl.batch_size={args.batch}",
        "gigassl.warmup_epochs=2", "gigassl.init_weights=random", f"gigassl.dim={args.width}",
        f"gigassl.proj_dim={args.width // 2}", "gigassl.export_chunks=16", f"gigassl.seed={args.seed}",
        *(f"gigassl.{s}" for s in variant.split() if s),
    ]  # fmt: skip
    name = "run-" + "".join(c if c.isalnum() else "-" for c in variant or "default")
    run = GigaSSLRun(name, str(root / "out"), str(root / "views"), load_config(None, settings),
                     export_from=str(root / "features"))  # fmt: skip
    summary = run.execute()
    aucs = {}
    for mode in ("running", "recalibrate"):
        target = str(root / "out" / f"{name}-{mode}.parquet")
        export_embeddings(summary.run_dir, str(root / "features"), target, export_bn=mode)
        report = run_probe(target, labels, str(root / "features"), sizes=(), repeats=args.repeats,
                           output=str(root / name / mode), scale=args.probe_scale)  # fmt: skip
        aucs[mode] = report.results["gigassl"]["full"]["auc_mean"]
        aucs["baseline"] = report.results["mean-pooled features"]["full"]["auc_mean"]
    aucs["loss"] = summary.history[-1]["train_loss"]
    return aucs


def few_labels(args: argparse.Namespace) -> None:
    """Probe AUC at few training slides: Giga-SSL (trained, untrained) vs mean-pooled tile features."""
    import time

    from slidestream.testing.cohort import embedded_cohort
    from slidestream.testing.encoder import pretrained_encoder
    from slidestream.trainers.encoder_pretrain import PretrainSettings

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-gigassl-few-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    weights = pretrained_encoder(work, PretrainSettings())
    naug, nt = (int(v) for v in args.views.split(","))
    cohort = embedded_cohort(work / f"cohort{args.few_labels}-seed{args.cohort_seed}", args.few_labels,
                             weights, args.cohort_seed, views=(naug, nt))  # fmt: skip
    print(f"encoder + cohort: {time.perf_counter() - started:.0f} s", flush=True)
    views, features = cohort.views["pretrained"], cohort.features["pretrained"]
    sizes = tuple(int(v) for v in args.sizes.split(","))
    rows: dict[str, dict[str, list[float]]] = {}
    losses = []
    for seed in args.seeds:
        for name, epochs in (("Giga-SSL trained", args.epochs), ("Giga-SSL untrained (epochs=0)", 0)):
            settings = [
                "gigassl.workers=0", f"gigassl.epochs={epochs}", f"gigassl.batch_size={args.batch}",
                "gigassl.warmup_epochs=2", "gigassl.init_weights=random", f"gigassl.lr={args.lr}",
                f"gigassl.seed={seed}", f"gigassl.export_chunks={args.export_chunks}",
                f"gigassl.export_bn={args.export_bn}",
            ]  # fmt: skip
            started = time.perf_counter()
            summary = GigaSSLRun(f"few-e{epochs}-s{seed}", cohort.out, views, load_config(None, settings),
                                 export_from=features).execute()  # fmt: skip
            if epochs:
                losses.append((summary.history[0]["train_loss"], summary.history[-1]["train_loss"]))
            report = run_probe(summary.embeddings, cohort.labels, features if epochs else None, sizes=sizes,
                               repeats=args.repeats, test_frac=args.test_frac, seed=seed,
                               output=summary.run_dir, scale=args.probe_scale)  # fmt: skip
            named = {name: report.results["gigassl"]}
            if epochs:
                named["mean-pooled tile features"] = report.results["mean-pooled features"]
            for label, by_size in named.items():
                for size, stats in by_size.items():
                    rows.setdefault(label, {}).setdefault(size, []).append(stats["auc_mean"])
            print(f"seed {seed} {name}: {time.perf_counter() - started:.0f} s, "
                  + ", ".join(f"{k}={v['auc_mean']:.3f}" for k, v in report.results["gigassl"].items()),
                  flush=True)  # fmt: skip
    columns = [str(s) for s in sizes] + ["full"]
    print(f"\nProbe AUC, {args.few_labels} hard slides (cohort seed {args.cohort_seed}), views {args.views}, "
          f"{args.epochs} epochs, batch {args.batch}, lr {args.lr}, export_bn {args.export_bn}; "
          f"{args.repeats} patient-level splits (test {args.test_frac}) per seed; "
          f"mean ± std over seeds {args.seeds}; loss first → last epoch "
          + ", ".join(f"{a:.2f} → {b:.2f}" for a, b in losses))  # fmt: skip
    print("| representation | " + " | ".join(f"{c} training slides" if c != "full" else "full training part"
                                            for c in columns) + " |")  # fmt: skip
    print("|---" * (len(columns) + 1) + "|")
    for label, by_size in rows.items():
        cells = [
            f"{np.mean(by_size[c]):.3f} ± {np.std(by_size[c]):.3f} ("
            + ", ".join(f"{v:.3f}" for v in by_size[c])
            + ")"
            if c in by_size
            else "-"
            for c in columns
        ]
        print(f"| {label} | " + " | ".join(cells) + " |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slides", type=int, default=48)
    parser.add_argument("--tiles", type=int, default=200, help="tiles per slide")
    parser.add_argument("--grid", type=int, default=30, help="tile grid cells per axis")
    parser.add_argument("--naug", type=int, default=4)
    parser.add_argument("--nt", type=int, default=64, help="tiles per stored augmentation")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--signal", type=float, default=1.0, help="tumour feature shift (× a normal draw)")
    parser.add_argument("--width", type=int, default=64, help="gigassl.dim (proj_dim is half)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--probe-scale",
        choices=SCALES,
        default=SCALES[0],
        help="probe on standardised (default) or raw embeddings (none; before 2026-12-07)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["cell_px=224", "cell_px=null"],
                        help="space-separated gigassl.* settings per run")  # fmt: skip
    parser.add_argument("--few-labels", type=int, help="slides of a hard pipeline cohort (see above)")
    parser.add_argument("--cohort-seed", type=int, default=7)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", default="8,32", help="--few-labels: stored augmentations, tiles each")
    parser.add_argument("--sizes", default="20,50", help="--few-labels: training slides of the probe")
    parser.add_argument("--lr", type=float, default=1e-3, help="--few-labels: gigassl.lr")
    parser.add_argument("--export-chunks", type=int, default=32)
    parser.add_argument("--export-bn", choices=get_args(ExportBN), default="running",
                        help="--few-labels: gigassl.export_bn of both networks")  # fmt: skip
    parser.add_argument("--test-frac", type=float, default=0.25, help="--few-labels: probe test share")
    parser.add_argument("--work", help="--few-labels: work directory (kept; default a new temporary one)")
    args = parser.parse_args()
    ensure_ray(load_config(None, ["ray.num_cpus=2"]).ray)
    if args.few_labels:
        few_labels(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-gigassl-fidelity-") as tmp:
        root = Path(tmp)
        labels = write_cohort(root, args)
        results = {v: measure(v, root, labels, args) for v in args.variants}
    print(f"\nGiga-SSL probe AUC, {args.slides} synthetic slides, {args.epochs} epochs, batch {args.batch}, "
          f"{args.repeats} splits (seed {args.seed})")  # fmt: skip
    print("| training variant | final loss | export_bn=running | export_bn=recalibrate | mean-pooled tiles |")
    print("|---|---|---|---|---|")
    for variant, r in results.items():
        cells = " | ".join(f"{r[k]:.3f}" for k in ("loss", "running", "recalibrate", "baseline"))
        print(f"| {variant or 'default'} | {cells} |")


if __name__ == "__main__":
    main()
