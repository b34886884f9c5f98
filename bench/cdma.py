"""CDMA benchmark: training patches/s with 1 and 2 Ray Train workers, slide-inference tiles/s, and the
learning check (synthetic slides, 10 % labelled: CDMA and supervised-only Dice on the tumour class).

The data: `--slides` synthetic "tiny" slides written once under `--work` (reused when present), ingested
at `--mpp` / `--tile-px`. Training throughput comes from the trainer's own `epoch_s` (training steps only,
no validation) of the last epoch, through `slidestream train cdma` (`run_cdma`, Ray Train, gloo on CPU);
patches/s = steps × batch × workers / epoch_s (a patch = one labelled or unlabelled tile of a batch).
The baseline in the same run is 1 worker (ratio 2 workers ÷ 1). Inference: `predict_slide` over a test
slide's tissue with the trained weights, tiles/s for `--infer-batch` against batch 1 (the baseline).
`--learning` trains `--epochs` epochs with the real data loop and prints the test-slide Dice of both runs.

    python bench/cdma.py [--work DIR] [--slides 12] [--mpp 2.0] [--tile-px 64] [--network light]
                         [--weights random|PATH] [--steps 8] [--batch 16] [--infer-batch 16]
                         [--learning --epochs 30]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from slidestream.cluster.config import load_config
from slidestream.cluster.storage import join
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.synthetic import write_dataset
from slidestream.trainers.cdma.infer import predict_slide
from slidestream.trainers.cdma.run import WEIGHTS_FILE, CDMARun
from slidestream.trainers.models.mtnet import build_mtnet
from slidestream.trainers.session import load_weights


def _data(args: argparse.Namespace) -> tuple[str, str]:
    work = Path(args.work)
    slides, out = work / "slides", work / "out"
    if not (slides / "synth.json").exists():
        t = time.perf_counter()
        write_dataset(str(slides), args.slides, seed=11, size="tiny", fmt="svs", positive_fraction=0.6)
        print(f"wrote {args.slides} slides in {time.perf_counter() - t:.0f} s")
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
    model = build_mtnet(len(config.cdma.classes), config.cdma.network)
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


def _learning(args: argparse.Namespace, slides: str, out: str) -> None:
    config = _config(
        args, slides, f"cdma.epochs={args.epochs}", f"cdma.steps_per_epoch={args.steps}",
        f"cdma.unsup_start_epoch={min(15, args.epochs // 2)}", f"cdma.milestones=[{int(args.epochs * 0.75)}]",
        "cdma.labelled_frac=0.1", f"cdma.workers={args.workers}",
    )  # fmt: skip
    t = time.perf_counter()
    metrics = CDMARun(f"bench-learning-{int(time.time())}", out, config).execute()
    print(f"learning run: {time.perf_counter() - t:.0f} s; split {json.dumps(metrics['split'])}")
    for name, result in metrics["runs"].items():
        dice = [r["dice_tumour"] for r in result["slides"]]
        print(f"  {name:<11} tumour Dice per test slide {[round(d, 3) for d in dice]}, mean {result['mean']}")


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
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="per worker, half labelled (cdma.batch_size)")
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--learning", action="store_true")
    parser.add_argument("--epochs", type=int, default=30)
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
