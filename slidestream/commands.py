"""What each `slidestream` command does (argument parsing lives in `slidestream.cli`).

A command is `cmd_<name>(config, *, flag=value, …) -> exit code`: the resolved configuration and,
keyword-only and typed, the flags that are not settings (those are in the config already).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from slidestream.cluster.config import Config
from slidestream.cluster.errors import UsageError
from slidestream.cluster.storage import filesystem, join
from slidestream.output_commands import cmd_status, print_json
from slidestream.pipelines.embed import EmbedStage, run_embed
from slidestream.pipelines.encoder_tiling import encoder_tiling
from slidestream.pipelines.features import FeatureBags
from slidestream.pipelines.ingest import run_ingest
from slidestream.pipelines.labels import read_labels
from slidestream.pipelines.ledger import Ledger
from slidestream.pipelines.slides import discover_slides
from slidestream.pipelines.stream import IngestReport
from slidestream.pipelines.synthetic import write_dataset
from slidestream.pipelines.writer_lock import WriterLock
from slidestream.trainers.methods import METHODS, Method, TrainRequest

log = logging.getLogger("slidestream")

EXIT_FAILED_SLIDES = 3  # --strict and some slides failed


def cmd_synth(
    config: Config,
    *,
    out: str,
    n_slides: int,
    seed: int,
    size: str,
    fmt: str,
    positive_fraction: float,
    no_pen_marks: bool,
    difficulty: str,
    sites: int,
    tumour_cover: tuple[float, float],
) -> int:
    made = write_dataset(
        out,
        n_slides,
        seed=seed,
        size=size,
        fmt=fmt,
        positive_fraction=positive_fraction,
        pen_marks=not no_pen_marks,
        difficulty=difficulty,
        sites=sites,
        tumour_cover=(tumour_cover[0], tumour_cover[1]),
    )
    positives = sum(made.labels)
    kind = f"{difficulty} ({sites} sites)" if difficulty == "hard" else difficulty
    print(f"wrote {len(made.uris)} {kind} {size} {fmt} slides ({positives} positive) to {out}")
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


def _ingest(
    config: Config,
    command: str,
    slides: str,
    out: str,
    labels: str | None,
    strict: bool,
    embed: EmbedStage | None,
) -> int:
    if labels:
        read_labels(labels)  # fail before any work when the labels file is unusable
    with WriterLock(out, command, config.watch.lock_ttl_s):
        report = run_ingest(slides, out, config, embed=embed)
    print(report.summary())
    if embed is not None:
        print(f"  features: {join(out, embed.stage)} ({embed.info.dim}-d, weights {embed.weights})")
    if labels:
        _check_labels(labels, report, out)
    return EXIT_FAILED_SLIDES if strict and report.failed else 0


def cmd_ingest(config: Config, *, slides: str, out: str, labels: str | None, strict: bool) -> int:
    return _ingest(config, "ingest", slides, out, labels, strict, None)


def _views(
    config: Config, out: str, encoder: str, weights: str, views: tuple[int, int] | None, strict: bool
) -> int:
    """Giga-SSL views from the committed shards, when `--gigassl-views` asks for them."""
    if not views:
        return 0
    stage = EmbedStage(encoder, weights, config.tiling, config.embed, views=views)
    report = run_embed(out, config, stage)
    print(
        f"Giga-SSL views: {len(report.ok)} slides ({report.tiles} augmented tiles embedded), "
        f"{len(report.failed)} failed → {join(out, stage.stage)}"
    )
    return EXIT_FAILED_SLIDES if strict and report.failed else 0


def cmd_run(
    config: Config,
    *,
    slides: str,
    out: str,
    encoder: str,
    weights: str,
    labels: str | None,
    strict: bool,
    gigassl_views: tuple[int, int] | None,
) -> int:
    config = encoder_tiling(config, encoder)
    embed = EmbedStage(encoder, weights, config.tiling, config.embed)
    status = _ingest(config, "run", slides, out, labels, strict, embed)
    return _views(config, out, encoder, weights, gigassl_views, strict) or status


def cmd_embed(
    config: Config,
    *,
    out: str,
    encoder: str,
    weights: str,
    strict: bool,
    gigassl_views: tuple[int, int] | None,
) -> int:
    config = encoder_tiling(config, encoder)
    stage = EmbedStage(encoder, weights, config.tiling, config.embed)
    with WriterLock(out, "embed", config.watch.lock_ttl_s):
        report = run_embed(out, config, stage)
    print(report.summary())
    print(f"  features: {join(out, stage.stage)} ({stage.info.dim}-d, weights {stage.weights})")
    status = EXIT_FAILED_SLIDES if strict and report.failed else 0
    return _views(config, out, encoder, weights, gigassl_views, strict) or status


def cmd_watch(
    config: Config,
    *,
    slides: str,
    out: str,
    encoder: str,
    weights: str,
    score_run: str | None,
    json_status: str | None,
) -> int:
    from slidestream.pipelines.watch import Watcher

    config = encoder_tiling(config, encoder)
    discover_slides(slides, config.ingest.slide_extensions)  # a wrong source fails before Ray starts
    embed = EmbedStage(encoder, weights, config.tiling, config.embed)
    features = join(out, embed.stage)
    scorer = None
    if score_run:
        from slidestream.trainers.mil.stream_scoring import NewSlideScorer

        name = score_run.rstrip("/").rsplit("/", 1)[-1]
        output = join(out, "watch", "predict", name)
        scorer = NewSlideScorer(score_run, features, output, dim=embed.info.dim)
    watcher = Watcher(slides, out, config, embed, status_uri=json_status, on_committed=scorer)
    print(f"watching {slides} every {config.watch.interval_s:g} s → {features}", flush=True)
    print(f"  status: {watcher.status_uri}; stop with Ctrl-C or SIGTERM", flush=True)
    status = watcher.run()
    lat = status.latency()
    print(
        f"watch stopped: {status.committed} committed, {status.failed} failed, {status.seen} seen, "
        f"{status.bursts} bursts, latency p50 {lat['p50']} s p95 {lat['p95']} s",
        flush=True,
    )
    return 0


def _features_dir(out: str, features: str | None, under: str) -> str:
    """`--features`, or the single feature directory under OUT/<under> (an error when it is ambiguous):
    the method table's `features_under` (the feature bags, or the Giga-SSL view sets)."""
    if features:
        return features
    fs, root = filesystem(join(out, under))
    found = (
        sorted(e["name"] for e in fs.ls(root, detail=True) if e["type"] == "directory")
        if fs.exists(root)
        else []
    )
    if len(found) != 1:
        names = ", ".join(p.rsplit("/", 1)[-1] for p in found) or "none"
        raise UsageError(f"pass --features: {join(out, under)} holds {len(found)} feature sets ({names})")
    return join(out, under, found[0].rsplit("/", 1)[-1])


def cmd_probe(
    config: Config,
    *,
    embeddings: str,
    labels: str,
    baseline_features: str | None,
    sizes: str,
    repeats: int,
    test_frac: float,
    output: str | None,
    scale: str,
) -> int:
    from slidestream.trainers.gigassl.probe import format_probe, run_probe

    try:
        small = tuple(int(v) for v in sizes.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--sizes expects comma-separated integers, got {sizes!r}") from None
    report = run_probe(
        embeddings, labels, baseline_features, small, repeats, test_frac, output=output, scale=scale
    )
    splits = "patient-level stratified" if report.by_patient else "stratified"
    scaled = "standardised" if scale == "standard" else "raw"
    print(
        f"linear probe (logistic regression C=10, balanced, on the {scaled} embeddings; ROC-AUC over "
        f"{repeats} {splits} splits) of {report.n_slides} slides, classes {report.classes}"
    )
    print(format_probe(report))
    print(f"  results: {report.report}")
    print(f"  embedding map: {report.picture}")
    return 0


def cmd_encoders(*, as_json: bool) -> int:
    """The preset encoders: what each embeds and what its weights need."""
    from slidestream.pipelines.encoder_presets import preset_rows

    rows = preset_rows()
    if as_json:
        print_json({"presets": rows})
        return 0
    print(f"{'preset':<14} {'dim':>5}  {'tiles → input':<25} {'params':>7}  {'feature':<15} licence")
    for r in rows:
        crop = f" → crop {r['input_px']}" if r["resize_px"] != r["input_px"] else ""
        tiles = f"{r['tile_px']}@{r['mpp']} → {r['resize_px']}{crop}"
        size = f"{r['params_m']}M"
        print(f"{r['name']:<14} {r['dim']:>5}  {tiles:<25} {size:>7}  {r['feature']:<15} {r['licence']}")
    print("weights: --weights FILE or a model folder / Hugging Face cache entry (nothing is downloaded)")
    print("also: resnet50_trunc, resnet18_trunc, resnet10t_64, resnet18_64, timm:<model>; docs/encoders.md")
    return 0


def cmd_pretrain_encoder(
    *, out: str, encoder: str, slides: int, tiles_per_slide: int, epochs: int, seed: int, contrastive: float
) -> int:
    from slidestream.trainers.encoder_pretrain import PretrainSettings, pretrain_tile_encoder

    settings = PretrainSettings(
        slides=slides, tiles_per_slide=tiles_per_slide, epochs=epochs, seed=seed, contrastive=contrastive,
        encoder=encoder,
    )  # fmt: skip
    settings.check()
    print(
        f"pretraining {encoder}: {slides} hard synthetic slides (seed {seed}), "
        f"{tiles_per_slide} tiles per slide, NT-Xent weight {contrastive:g}"
    )
    report = pretrain_tile_encoder(out, settings)
    held = report.counts
    print(
        f"wrote {report.weights} in {report.seconds:.0f} s: held-out tumour AUC {report.held_out_auc:.3f} "
        f"({held['held_out_tiles']} tiles of {held['held_out_slides']} unseen slides)"
    )
    print(f"  use it as: --encoder {encoder} --weights {report.weights}  (features key {report.key})")
    if encoder == "resnet18_64":
        print(f"  or as the light CDMA network's encoder: --set cdma.weights={report.weights}")
    return 0


def _needs(method: Method) -> str:
    """The flags `train KIND` cannot do without, as its usage error says them."""
    *first, last = [f"--{flag}" for flag in method.needs]
    listed = f"{', '.join(first)} and {last}" if first else last
    return listed + (f" ({method.needs_note})" if method.needs_note else "")


def cmd_train(
    config: Config,
    *,
    kind: str,
    name: str,
    out: str,
    features: str | None = None,
    labels: str | None = None,
    rounds: int = 1,
    encoder: str | None = None,
    weights: str | None = None,
    export: bool = False,
) -> int:
    """Runs the method table's entry for `kind`: its run (which says what starts), its printed summary,
    then the run's outputs; a run that could not finish is exit 1."""
    from slidestream.trainers.fit import TrainingError

    method = METHODS[kind]
    if encoder:
        config = encoder_tiling(config, encoder)
    request = TrainRequest(
        kind,
        name,
        out,
        features,
        labels=labels,
        encoder=encoder,
        weights=weights,
        rounds=rounds,
        export=export,
    )
    if not all(getattr(request, flag) for flag in method.needs):
        raise UsageError(f"train {kind} needs {_needs(method)}")
    if method.features_under:
        request = replace(request, feature_dir=_features_dir(out, features, method.features_under))
    if export and (exporter := method.exporter()):
        print(exporter(request, config))
        return 0
    try:
        result = method.runner()(request, config)
    except TrainingError as exc:
        print(f"slidestream train: {exc}")
        return 1
    print(method.reporter()(result))
    for what, file in method.outputs:
        print(f"  {what}: {join(request.run_dir, file)}")
    return 0


def cmd_tune(
    config: Config,
    *,
    kind: str,
    name: str,
    out: str,
    space: str,
    trials: int,
    features: str | None,
    labels: str | None,
) -> int:
    from slidestream.trainers.tune.sweep import run_sweep

    under = METHODS[kind].features_under
    bags = _features_dir(out, features, under) if under else None
    summary = run_sweep(kind, name, out, space, config, trials, bags, labels)
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


def cmd_predict(
    config: Config, *, run: str, features: str, output: str | None, heatmaps: bool, slides: str | None
) -> int:
    from slidestream.trainers.mil.predict import predict_run

    report = predict_run(run, features, output=output, heatmaps=heatmaps, slides=slides)
    print(f"predicted {report.n_slides} slides → {report.predictions}")
    if heatmaps:
        where = report.heatmaps[0].rsplit("/", 1)[0] if report.heatmaps else "-"
        print(f"  heatmaps: {len(report.heatmaps)} written, {len(report.heatmap_failures)} skipped → {where}")
    return 0


def cmd_demo(config: Config, *, out: str, n_slides: int) -> int:
    """The embedded default: synthetic slides on local disk → tiles + features in one pass → summary."""
    slides = join(out, "slides")
    labels = join(slides, "labels.csv")
    fs, path = filesystem(slides)
    if not fs.exists(join(path, "labels.csv")):
        made = write_dataset(slides, n_slides, seed=0, size="tiny", fmt="svs")
        print(f"demo: wrote {len(made.uris)} synthetic slides to {slides}")
    print("demo: encoder resnet18_trunc with RANDOM weights (no pretrained weights are downloaded)")
    embed = EmbedStage("resnet18_trunc", "random", config.tiling, config.embed)
    report = run_ingest(slides, out, config, embed=embed)
    print(report.summary())
    _check_labels(labels, report, out)
    cmd_status(config, out=out, as_json=False, stage=report.stage, fmt=None, output=None)
    features = join(out, embed.stage)
    bags = FeatureBags(features, labels)
    print(f"feature bags: {len(bags)} slides, {bags.dim}-d, in {features}")
    print("demo: MHIM-MIL on ABMIL (teacher = a baseline trained first on each fold)")
    name = "demo-mhim-abmil"
    if status := cmd_train(config, kind="mhim", name=name, out=out, features=features, labels=labels):
        return status
    run_dir = join(out, "runs", name)
    return cmd_predict(config, run=run_dir, features=features, output=None, heatmaps=True, slides=None)
