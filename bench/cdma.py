"""CDMA benchmark: training patches/s with 1 and 2 Ray Train workers, slide-inference tiles/s, and the
learning comparison (CDMA against supervised-only tumour Dice on held-out synthetic slides).

The data: `--slides` synthetic "tiny" slides written once under `--work` (one directory per cohort setting,
reused when present), ingested at `--mpp` / `--tile-px`. `--difficulty hard` writes a hard cohort
(`--sites` stainings, tumour of normal tissue's mean colour, `--tumour-cover` of the tissue per positive
slide). Training throughput comes from the trainer's own `epoch_s` (training steps only, no validation) of
the last epoch, through `slidestream train cdma` (`run_cdma`, Ray Train, gloo on CPU); patches/s =
steps × batch × workers / epoch_s (a patch = one labelled or unlabelled tile of a batch). The baseline in
the same run is 1 worker (ratio 2 workers ÷ 1). Inference: `predict_slide` over a test slide's tissue with
the trained weights, tiles/s for `--infer-batch` against batch 1 (the baseline).

`--learning`: for every labelled fraction of `--labelled-fracs` and every seed of `--seeds` (the seed sets
both the slide split and the training seed), one `CDMARun` trains CDMA and its supervised-only twin
(`cdma.supervised_baseline`: the same labelled slides, steps and seed, no unlabelled data) for `--epochs`
× `--steps` and applies both to the held-out test slides. Printed per fraction: the pooled tumour Dice
(all test slides' pixels together) and the mean per-slide Dice over the positive test slides, mean ± std
over seeds for CDMA and supervised-only, and the paired difference CDMA − supervised (mean ± std, wins).
Runs are named by fraction and seed, so a rerun with the same settings resumes instead of retraining.

    python bench/cdma.py [--work DIR] [--slides 12] [--mpp 2.0] [--tile-px 64] [--network light]
                         [--weights random|PATH] [--encoder-bn auto|frozen|train] [--steps 8]
                         [--batch 16] [--infer-batch 16]
                         [--learning --epochs 30 [--difficulty hard --tumour-cover 0.05 0.2]
                          [--labelled-fracs 0.1 0.05] [--labelled-slides stratified|foreground]
                         [--seeds 0 1 2] [--lr 1e-3]]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path
from typing import Any, get_args

import torch

from slidestream.cluster.config import LabelledSlides, load_config
from slidestream.cluster.storage import join
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.synthetic import write_dataset
from slidestream.trainers.cdma.infer import predict_slide
from slidestream.trainers.cdma.run import WEIGHTS_FILE, CDMARun, encoder_bn
from slidestream.trainers.models.mtnet import build_mtnet
from slidestream.trainers.session import load_weights


def _data(args: argparse.Namespace) -> tuple[str, str]:
    cohort = f"{args.difficulty}-n{args.slides}"
    if args.difficulty == "hard":
        cohort += f"-sites{args.sites}-cover{args.tumour_cover[0]:g}-{args.tumour_cover[1]:g}"
    work = Path(args.work) / cohort
    slides, out = work / "slides", work / "out"
    if not (slides / "synth.json").exists():
        t = time.perf_counter()
        write_dataset(
            str(slides), args.slides, seed=11, size="tiny", fmt="svs", positive_fraction=0.6,
            difficulty=args.difficulty, sites=args.sites, tumour_cover=tuple(args.tumour_cover),
        )  # fmt: skip
        print(f"wrote {args.slides} {args.difficulty} slides in {time.perf_counter() - t:.0f} s")
    config = load_config(None, [f"tiling.mpp={args.mpp}", f"tiling.tile_px={args.tile_px}"])
    report = run_ingest(str(slides), str(out), config)
    print(report.summary())
    return str(slides), str(out)


def _config(args: argparse.Namespace, slides: str, *extra: str):
    return load_config(
        None,
        [
            f"tiling.mpp={args.mpp}",
            f"tiling.tile_px={args.tile_px}",
            f"cdma.network={args.network}",
            f"cdma.weights={args.weights}",
            f"cdma.encoder_bn={args.encoder_bn}",
            f"cdma.annotations={join(slides, 'masks')}",
            f"cdma.batch_size={args.batch}",
            "cdma.cpus_per_worker=1",
            *extra,
        ],
    )


def _throughput(args: argparse.Namespace, slides: str, out: str) -> tuple[list[tuple[str, float]], CDMARun]:
    """Training patches/s for each worker count; the first run is returned for the inference part."""
    rows, runs = [], []
    for workers in args.worker_counts:
        config = _config(
            args, slides, f"cdma.workers={workers}", f"cdma.steps_per_epoch={args.steps}", "cdma.epochs=2",
            "cdma.supervised_baseline=false", "cdma.unsup_start_epoch=0", "cdma.val_slides=0",
            "cdma.test_frac=0.05",
        )  # fmt: skip
        run = CDMARun(f"bench-w{workers}-{int(time.time())}", out, config)
        last = run.execute()["runs"]["cdma"]["history"][-1]
        patches = args.steps * args.batch * workers
        rows.append((f"train, {workers} worker(s)", patches / last["epoch_s"]))
        runs.append(run)
    return rows, runs[0]


def _inference(args: argparse.Namespace, run: CDMARun) -> list[tuple[str, float]]:
    """Slide inference tiles/s (windows of the sliding window) at batch 1 and `--infer-batch`."""
    config = run.config
    model = build_mtnet(len(config.cdma.classes), config.cdma.network, encoder_bn=encoder_bn(config.cdma))
    model.load_state_dict(load_weights(join(run.run_dir, "jobs", "cdma", WEIGHTS_FILE)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    uri = run.entries[run.split.test[0]].uri
    rows = []
    for batch in (1, args.infer_batch):
        t = time.perf_counter()
        pred = predict_slide(model, uri, config.tiling, config.tissue, 32.0, 0.25, batch, device)
        rows.append((f"slide inference, batch {batch}", pred.windows / (time.perf_counter() - t)))
    return rows


def _learning_run(args: argparse.Namespace, slides: str, out: str, frac: float, seed: int) -> dict[str, Any]:
    """One split and seed: CDMA and its supervised-only twin, trained and applied to the test slides."""
    config = _config(
        args, slides, f"cdma.epochs={args.epochs}", f"cdma.steps_per_epoch={args.steps}",
        f"cdma.unsup_start_epoch={min(15, args.epochs // 2)}", f"cdma.milestones=[{int(args.epochs * 0.75)}]",
        f"cdma.labelled_frac={frac}", f"cdma.workers={args.workers}", f"cdma.lr={args.lr}",
        f"cdma.test_frac={args.test_frac}", f"cdma.split_seed={seed}", f"cdma.seed={seed}",
        f"cdma.labelled_slides={args.labelled_slides}",
        "cdma.supervised_baseline=true",
    )  # fmt: skip
    weights = "random" if args.weights == "random" else Path(args.weights).stem
    schedule = f"{args.epochs}x{args.steps}-lr{args.lr:g}"
    picked = "" if args.labelled_slides == "stratified" else f"-{args.labelled_slides}"
    name = f"learn-{schedule}-{weights}-bn{encoder_bn(config.cdma)}-f{frac:g}{picked}-s{seed}"
    t = time.perf_counter()
    metrics = CDMARun(name, out, config).execute()
    print(f"{name}: {time.perf_counter() - t:.0f} s; split {json.dumps(metrics['split'])}", flush=True)
    return metrics


def _scores(metrics: dict[str, Any], positive: set[str]) -> dict[str, tuple[float, float]]:
    """Per run: (pooled tumour Dice over the test slides, mean tumour Dice of the positive test slides)."""
    scores = {}
    for name, result in metrics["runs"].items():
        per_slide = [r["dice_tumour"] for r in result["slides"] if r["slide_id"] in positive]
        scores[name] = (result["pooled"]["dice_tumour"], statistics.fmean(per_slide))
        dice = {r["slide_id"]: round(r["dice_tumour"], 3) for r in result["slides"]}
        print(f"  {name:<11} pooled {scores[name][0]:.3f}; per test slide {dice}")
    return scores


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def _learning(args: argparse.Namespace, slides: str, out: str) -> None:
    with (Path(slides) / "labels.csv").open() as handle:
        positive = {row["slide_id"] for row in csv.DictReader(handle) if row["label"] == "1"}
    table = []
    for frac in args.labelled_fracs:
        runs = [_scores(_learning_run(args, slides, out, frac, seed), positive) for seed in args.seeds]
        for k, measure in enumerate(("pooled Dice", "per-slide Dice (positives)")):
            cdma = [r["cdma"][k] for r in runs]
            sup = [r["supervised"][k] for r in runs]
            diff = [c - s for c, s in zip(cdma, sup, strict=True)]
            wins = sum(d > 0 for d in diff)
            table.append((f"{frac:.0%}", measure, _mean_std(cdma), _mean_std(sup), _mean_std(diff), wins))
    cohort = f"{args.slides} {args.difficulty} tiny slides"
    if args.difficulty == "hard":
        cohort += f", {args.sites} sites, tumour {args.tumour_cover[0]:g}-{args.tumour_cover[1]:g} of tissue"
    bn = encoder_bn(_config(args, slides).cdma)
    training = (
        f"{args.network} MTNet ({bn} encoder BN), {args.epochs} epochs × {args.steps} steps, lr {args.lr:g}"
    )
    print(f"\nCDMA vs supervised-only, {cohort}; {training}, seeds {args.seeds}")
    print("tumour Dice on the held-out slides, mean ± std over seeds")
    header = ("labelled", "measure", "CDMA", "supervised-only", "CDMA − supervised", "wins")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in table:
        print(f"| {row[0]} | {row[1]} | {row[2]} | {row[3]} | {row[4]} | {row[5]}/{len(args.seeds)} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", default="/tmp/slidestream-bench-cdma")
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--mpp", type=float, default=2.0)
    parser.add_argument("--tile-px", type=int, default=64)
    parser.add_argument("--network", default="light", choices=["light", "official"])
    parser.add_argument(
        "--weights", default="random", help="cdma.weights: the encoder's ImageNet file, or random (timing)"
    )
    parser.add_argument(
        "--encoder-bn", default="auto", choices=["auto", "frozen", "train"], help="cdma.encoder_bn"
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="per worker, half labelled (cdma.batch_size)")
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--difficulty", default="easy", choices=["easy", "hard"], help="synthetic cohort")
    parser.add_argument("--sites", type=int, default=3, help="stainings of a hard cohort")
    parser.add_argument(
        "--tumour-cover", type=float, nargs=2, default=[0.005, 0.08], metavar=("LO", "HI"),
        help="hard cohort: tumour fraction of the tissue per positive slide, log-uniform in [LO, HI]",
    )  # fmt: skip
    parser.add_argument("--learning", action="store_true")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3, help="cdma.lr of the --learning runs")
    parser.add_argument("--labelled-fracs", type=float, nargs="+", default=[0.1], help="--learning")
    parser.add_argument(
        "--labelled-slides", default="stratified", choices=get_args(LabelledSlides),
        help="cdma.labelled_slides of the --learning runs",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="--learning: split and training")
    parser.add_argument("--test-frac", type=float, default=0.2, help="cdma.test_frac of the --learning runs")
    parser.add_argument("--workers", type=int, default=1, help="workers of the --learning runs")
    parser.add_argument("--worker-counts", type=int, nargs="+", default=[1, 2], help="throughput runs")
    args = parser.parse_args()
    slides, out = _data(args)
    if args.learning:
        _learning(args, slides, out)
        return
    rows, run = _throughput(args, slides, out)
    rows += _inference(args, run)
    device = "cuda" if torch.cuda.is_available() else "cpu (no GPU here)"
    print(f"\nCDMA {args.network} MTNet, {args.tile_px}-px tiles at {args.mpp} µm/px, device {device}")
    print(f"| {'measurement':<34} | {'per second':>10} |")
    for name, value in rows:
        print(f"| {name:<34} | {value:>10.1f} |")
    infer = rows[len(args.worker_counts) :]
    print(f"inference batch {args.infer_batch} ÷ 1: {infer[1][1] / infer[0][1]:.2f}×")
    if args.worker_counts == [1, 2]:
        print(f"ratio 2 workers ÷ 1: {rows[1][1] / rows[0][1]:.2f}×")


if __name__ == "__main__":
    main()
