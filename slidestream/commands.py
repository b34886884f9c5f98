"""What each `slidestream` command does (argument parsing lives in `slidestream.cli`)."""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter

from slidestream.cluster.config import Config
from slidestream.cluster.storage import filesystem, join
from slidestream.pipelines.embed import EmbedStage, run_embed
from slidestream.pipelines.features import FeatureBags
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.labels import read_labels
from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.pipelines.slides import discover_slides
from slidestream.pipelines.stream import IngestReport
from slidestream.pipelines.synthetic import write_dataset
from slidestream.pipelines.tile_store import tiles_stage
from slidestream.pipelines.writer_lock import WriterLock

log = logging.getLogger("slidestream")

EXIT_FAILED_SLIDES = 3  # --strict and some slides failed


def print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=1, sort_keys=False))


def cmd_synth(args: argparse.Namespace, config: Config) -> int:
    made = write_dataset(
        args.out,
        args.n_slides,
        seed=args.seed,
        size=args.size,
        fmt=args.fmt,
        positive_fraction=args.positive_fraction,
        pen_marks=not args.no_pen_marks,
    )
    positives = sum(made.labels)
    print(f"wrote {len(made.uris)} {args.size} {args.fmt} slides ({positives} positive) to {args.out}")
    print(f"labels: {made.labels_uri}")
    return 0


def _check_labels(labels_uri: str, report: IngestReport, out: str) -> None:
    labelled = set(read_labels(labels_uri).column("slide_id").to_pylist())
    ingested = {e.slide_id for e in Ledger(out).entries(report.stage) if e.status == "ok"}
    if unlabelled := sorted(ingested - labelled):
        log.warning(
            "%d ingested slide(s) have no label in %s: %s",
            len(unlabelled),
            labels_uri,
            ", ".join(unlabelled[:10]),
        )
    if absent := sorted(labelled - ingested):
        log.warning("%d labelled slide(s) were not ingested: %s", len(absent), ", ".join(absent[:10]))


def _ingest(args: argparse.Namespace, config: Config, embed: EmbedStage | None) -> int:
    if args.labels:
        read_labels(args.labels)  # fail before any work when the labels file is unusable
    with WriterLock(args.out, args.command, config.watch.lock_ttl_s):
        report = run_ingest(args.slides, args.out, config, embed=embed)
    print(report.summary())
    if embed is not None:
        print(f"  features: {join(args.out, embed.stage)} ({embed.info.dim}-d, weights {embed.weights})")
    if args.labels:
        _check_labels(args.labels, report, args.out)
    return EXIT_FAILED_SLIDES if args.strict and report.failed else 0


def cmd_ingest(args: argparse.Namespace, config: Config) -> int:
    return _ingest(args, config, None)


def _views(args: argparse.Namespace, config: Config) -> int:
    """Giga-SSL views from the committed shards, when `--gigassl-views` asks for them."""
    if not args.gigassl_views:
        return 0
    views = EmbedStage(args.encoder, args.weights, config.tiling, config.embed, views=args.gigassl_views)
    report = run_embed(args.out, config, views)
    print(
        f"Giga-SSL views: {len(report.ok)} slides ({report.tiles} augmented tiles embedded), "
        f"{len(report.failed)} failed → {join(args.out, views.stage)}"
    )
    return EXIT_FAILED_SLIDES if args.strict and report.failed else 0


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    status = _ingest(args, config, EmbedStage(args.encoder, args.weights, config.tiling, config.embed))
    return _views(args, config) or status


def cmd_embed(args: argparse.Namespace, config: Config) -> int:
    stage = EmbedStage(args.encoder, args.weights, config.tiling, config.embed)
    with WriterLock(args.out, "embed", config.watch.lock_ttl_s):
        report = run_embed(args.out, config, stage)
    print(report.summary())
    print(f"  features: {join(args.out, stage.stage)} ({stage.info.dim}-d, weights {stage.weights})")
    status = EXIT_FAILED_SLIDES if args.strict and report.failed else 0
    return _views(args, config) or status


def cmd_watch(args: argparse.Namespace, config: Config) -> int:
    from slidestream.pipelines.watch import Watcher

    discover_slides(args.slides, config.ingest.slide_extensions)  # a wrong source fails before Ray starts
    embed = EmbedStage(args.encoder, args.weights, config.tiling, config.embed)
    features = join(args.out, embed.stage)
    scorer = None
    if args.score_run:
        from slidestream.trainers.stream_scoring import NewSlideScorer

        name = args.score_run.rstrip("/").rsplit("/", 1)[-1]
        output = join(args.out, "watch", "predict", name)
        scorer = NewSlideScorer(args.score_run, features, output, dim=embed.info.dim)
    watcher = Watcher(args.slides, args.out, config, embed, status_uri=args.json_status, on_committed=scorer)
    print(f"watching {args.slides} every {config.watch.interval_s:g} s → {features}", flush=True)
    print(f"  status: {watcher.status_uri}; stop with Ctrl-C or SIGTERM", flush=True)
    status = watcher.run()
    lat = status.latency()
    print(
        f"watch stopped: {status.committed} committed, {status.failed} failed, {status.seen} seen, "
        f"{status.bursts} bursts, latency p50 {lat['p50']} s p95 {lat['p95']} s",
        flush=True,
    )
    return 0


def status_payload(entries: list[LedgerEntry]) -> dict:
    counts = Counter(e.status for e in entries)
    return {
        "slides": [
            {"slide_id": e.slide_id, "status": e.status, "n_tiles": e.n_tiles, "error": e.error}
            for e in entries
        ],
        "totals": {
            "slides": len(entries),
            "ok": counts["ok"],
            "failed": counts["failed"],
            "skipped": counts["skipped"],
            "tiles": sum(e.n_tiles for e in entries),
        },
    }


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    stage = args.stage or tiles_stage(config.tiling)
    payload = status_payload(Ledger(args.out).entries(stage))
    if args.json:
        print_json({"stage": stage, **payload})
        return 0
    print(f"{args.out} [{stage}]")
    print(f"{'slide_id':<28} {'status':<7} {'tiles':>7}  error")
    for slide in payload["slides"]:
        print(f"{slide['slide_id']:<28} {slide['status']:<7} {slide['n_tiles']:>7}  {slide['error'] or ''}")
    totals = payload["totals"]
    print(f"{totals['slides']} slides: {totals['ok']} ok, {totals['failed']} failed, {totals['tiles']} tiles")
    return 0


def _features_dir(args: argparse.Namespace, under: str = "features") -> str:
    """`--features`, or the single feature directory under OUT/<under> (an error when it is ambiguous);
    `under="gigassl"`: the Giga-SSL view sets."""
    if args.features:
        return args.features
    fs, root = filesystem(join(args.out, under))
    found = (
        sorted(e["name"] for e in fs.ls(root, detail=True) if e["type"] == "directory")
        if fs.exists(root)
        else []
    )
    if len(found) != 1:
        names = ", ".join(p.rsplit("/", 1)[-1] for p in found) or "none"
        raise ValueError(
            f"pass --features: {join(args.out, under)} holds {len(found)} feature sets ({names})"
        )
    return join(args.out, under, found[0].rsplit("/", 1)[-1])


def _print_outputs(run_dir: str, **files: str) -> None:
    """One line per output of a finished run: `  <what>: <run_dir>/<file>`."""
    for what, name in files.items():
        print(f"  {what}: {join(run_dir, name)}")


def _train_icmil(args: argparse.Namespace, config: Config) -> int:
    from slidestream.trainers.icmil import ICMILError, format_rounds, run_icmil

    if not args.labels or not args.encoder or not args.weights:
        raise ValueError("train icmil needs --labels, --encoder and --weights (a local file, or 'random')")
    run_dir = join(args.out, "runs", args.name)
    print(f"train icmil: {config.train.model} ⇄ {args.encoder}, {args.rounds} round(s) → {run_dir}")
    try:
        summary = run_icmil(args.name, args.out, args.labels, args.encoder, args.weights, config, args.rounds)
    except ICMILError as exc:
        print(f"slidestream train: {exc}")
        return 1
    print(format_rounds(summary.metrics))
    _print_outputs(run_dir, metrics="metrics.json", rounds="rounds.png")
    return 0


def _train_cdma(args: argparse.Namespace, config: Config) -> int:
    from slidestream.trainers.cdma import format_cdma_table, run_cdma

    print(f"train cdma: {config.cdma.network} MTNet on {args.out} → {join(args.out, 'runs', args.name)}")
    metrics = run_cdma(args.name, args.out, config)
    print(format_cdma_table(metrics))
    run_dir = join(args.out, "runs", args.name)
    _print_outputs(run_dir, metrics="metrics.json", **{"slide masks, overlays, GeoJSON": "slides"})
    return 0


def _train_gigassl(args: argparse.Namespace, config: Config) -> int:
    from slidestream.trainers.gigassl import GigaSSLRun, export_embeddings, tile_features_for

    views = _features_dir(args, "gigassl")
    run_dir = join(args.out, "runs", args.name)
    if args.export:  # --features: the bags to embed; default: the un-augmented tiles of the views' slides
        bags = args.features or tile_features_for(views) or views
        target = export_embeddings(
            run_dir, bags, export_chunks=config.gigassl.export_chunks, export_bn=config.gigassl.export_bn
        )
        print(f"embeddings of {bags} with run {args.name} → {target}")
        return 0
    cfg = config.gigassl
    print(
        f"train gigassl: {cfg.epochs} epochs, batch {cfg.batch_size} slides × 2 views × T={cfg.n_tiles} "
        f"over {max(1, cfg.workers)} worker(s), on {views} → {run_dir}"
    )
    summary = GigaSSLRun(args.name, args.out, views, config).execute()
    last = summary.history[-1]
    print(f"  final loss {last['train_loss']:.4f} ({last['slides_per_s']:.1f} slides/s)")
    print(f"  embeddings: {summary.embeddings}")
    _print_outputs(summary.run_dir, curves="curves.png")
    return 0


def cmd_probe(args: argparse.Namespace, config: Config) -> int:
    from slidestream.trainers.probe import format_probe, run_probe

    try:
        sizes = tuple(int(v) for v in args.sizes.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--sizes expects comma-separated integers, got {args.sizes!r}") from None
    report = run_probe(
        args.embeddings,
        args.labels,
        args.baseline_features,
        sizes,
        args.repeats,
        args.test_frac,
        output=args.output,
    )
    print(
        f"linear probe (logistic regression C=10, balanced; ROC-AUC over {args.repeats} stratified "
        f"splits) of {report.n_slides} slides, classes {report.classes}"
    )
    print(format_probe(report))
    print(f"  results: {report.report}")
    print(f"  embedding map: {report.picture}")
    return 0


def cmd_train(args: argparse.Namespace, config: Config) -> int:
    from slidestream.trainers.runner import TrainingError, format_table, run_training

    if args.kind == "icmil":
        return _train_icmil(args, config)
    if args.kind == "cdma":
        return _train_cdma(args, config)
    if args.kind == "gigassl":
        return _train_gigassl(args, config)
    if not args.labels:
        raise ValueError(f"train {args.kind} needs --labels")
    features = _features_dir(args)
    print(f"train {args.kind}: {config.train.model} on {features} → {join(args.out, 'runs', args.name)}")
    try:
        summary = run_training(args.kind, args.name, args.out, features, args.labels, config)
    except TrainingError as exc:
        print(f"slidestream train: {exc}")
        return 1
    print(format_table(summary.metrics))
    _print_outputs(
        summary.run_dir, metrics="metrics.json", predictions="predictions.parquet", curves="curves.png"
    )
    return 0


def cmd_tune(args: argparse.Namespace, config: Config) -> int:
    from slidestream.trainers.tune import run_sweep

    features = (
        None
        if args.kind == "cdma"
        else _features_dir(args, "gigassl" if args.kind == "gigassl" else "features")
    )
    summary = run_sweep(
        args.kind, args.name, args.out, args.space, config, args.trials, features, args.labels
    )
    monitor = summary.monitor
    keys = list(summary.best_params)
    print(f"{'trial':<22} " + " ".join(f"{k[-18:]:>18}" for k in keys) + f" {monitor:>10} {'epochs':>6}")
    for row in sorted(summary.table, key=lambda r: str(r["trial"])):
        cells = " ".join(f"{str(row[k])[:18]:>18}" for k in keys)
        print(f"{str(row['trial'])[-22:]:<22} {cells} {row[monitor]:>10.4f} {row['epochs']:>6}")
    print(f"best: {summary.best_params}")
    print(f"  best config: {summary.best_config}  (slidestream train … --config {summary.best_config})")
    print(f"  results: {join(summary.sweep_dir, 'results.csv')}, {join(summary.sweep_dir, 'results.png')}")
    return 0


def cmd_predict(args: argparse.Namespace, config: Config) -> int:
    from slidestream.trainers.predict import predict_run

    report = predict_run(
        args.run, args.features, output=args.output, heatmaps=args.heatmaps, slides=args.slides
    )
    print(f"predicted {report.n_slides} slides → {report.predictions}")
    if args.heatmaps:
        where = report.heatmaps[0].rsplit("/", 1)[0] if report.heatmaps else "-"
        print(f"  heatmaps: {len(report.heatmaps)} written, {len(report.heatmap_failures)} skipped → {where}")
    return 0


def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    from slidestream.submit import submit

    return submit(args)


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    """The embedded default: synthetic slides on local disk → tiles + features in one pass → summary."""
    slides = join(args.out, "slides")
    fs, path = filesystem(slides)
    if not fs.exists(join(path, "labels.csv")):
        made = write_dataset(slides, args.n_slides, seed=0, size="tiny", fmt="svs")
        print(f"demo: wrote {len(made.uris)} synthetic slides to {slides}")
    print("demo: encoder resnet18_trunc with RANDOM weights (no pretrained weights are downloaded)")
    embed = EmbedStage("resnet18_trunc", "random", config.tiling, config.embed)
    report = run_ingest(slides, args.out, config, embed=embed)
    print(report.summary())
    _check_labels(join(slides, "labels.csv"), report, args.out)
    cmd_status(argparse.Namespace(out=args.out, json=False, stage=report.stage), config)
    features = join(args.out, embed.stage)
    bags = FeatureBags(features, join(slides, "labels.csv"))
    print(f"feature bags: {len(bags)} slides, {bags.dim}-d, in {features}")
    print("demo: MHIM-MIL on ABMIL (teacher = a baseline trained first on each fold)")
    train_args = argparse.Namespace(kind="mhim", name="demo-mhim-abmil", out=args.out, features=features,
                                    labels=join(slides, "labels.csv"))  # fmt: skip
    if status := cmd_train(train_args, config):
        return status
    run_dir = join(args.out, "runs", "demo-mhim-abmil")
    predict_args = argparse.Namespace(run=run_dir, features=features, output=None, heatmaps=True, slides=None)
    return cmd_predict(predict_args, config)
