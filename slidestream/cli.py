"""The `slidestream` command line."""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Callable, Sequence

from slidestream.cluster.config import Config, ConfigError, load_config
from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.storage import scrub_secrets
from slidestream.console import console
from slidestream.output_commands import STATUS_FORMATS
from slidestream.pipelines.synthetic import DIFFICULTIES, HARD_SITES, HARD_TUMOUR_COVER, SLIDE_FORMATS
from slidestream.trainers.gigassl.probe_scale import SCALES
from slidestream.trainers.methods import METHODS, TUNABLE
from slidestream.trainers.models import MODELS

log = logging.getLogger("slidestream")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        dest="config_file",
        metavar="CONFIG",
        help="configuration YAML (default: ./ray_config.yaml, else the shipped one)",
    )
    common.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set tiling.mpp=0.25 (repeatable)",
    )
    common.add_argument("--address", help="Ray address to connect to (default: start a local instance)")
    common.add_argument("-v", "--verbose", action="store_true")
    return common


def _workers(value: str) -> str:
    """`--workers N` or `--workers auto` (the config validates the number)."""
    if value != "auto" and not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a number of workers or 'auto', got {value!r}")
    return value


def _tiling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mpp", type=float, help="target µm/px of the tiles (tiling.mpp)")
    parser.add_argument("--tile-px", type=int, help="tile edge in pixels (tiling.tile_px)")
    parser.add_argument("--mpp-override", type=float, help="µm/px for slides without mpp metadata")


def _views(text: str) -> tuple[int, int]:
    try:
        naug, nt = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAUG,NT (e.g. 25,256), got {text!r}") from None
    if naug < 1 or nt < 1:
        raise argparse.ArgumentTypeError(f"NAUG and NT must be positive, got {text!r}")
    return naug, nt


def _views_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gigassl-views",
        type=_views,
        metavar="NAUG,NT",
        help="also store Giga-SSL views: NAUG augmentations × NT tiles per slide",
    )


ENCODER_HELP = (
    "a preset (uni, virchow2, h-optimus-0, …: `slidestream encoders`), resnet50_trunc, resnet18_trunc, "
    "resnet10t_64 or resnet18_64 (see pretrain-encoder) or timm:<model>"
)
WEIGHTS_HELP = "local weights file or model folder (a Hugging Face cache entry), or 'random' (explicitly)"


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="slidestream", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", parents=[common], help="synthetic slides → ingest → summary")
    demo.add_argument(
        "--out", default="slidestream-demo", help="output directory (default: ./slidestream-demo)"
    )
    demo.add_argument("--n-slides", type=int, default=24)

    synth = commands.add_parser("synth", parents=[common], help="write synthetic H&E-like slides")
    synth.add_argument("--out", required=True, help="directory or s3:// prefix")
    synth.add_argument("--n-slides", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", choices=["tiny", "small", "large"], default="tiny")
    synth.add_argument("--format", dest="fmt", choices=SLIDE_FORMATS, default="svs")
    synth.add_argument("--positive-fraction", type=float, default=0.5)
    synth.add_argument("--no-pen-marks", action="store_true")
    synth.add_argument(
        "--difficulty",
        choices=list(DIFFICULTIES),
        default="easy",
        help="hard: stain varies per site and slide, tumour has normal tissue's colour and covers a few %%",
    )
    synth.add_argument("--sites", type=int, default=HARD_SITES, help="hard: labs/scanners (stainings)")
    synth.add_argument(
        "--tumour-cover",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=HARD_TUMOUR_COVER,
        help="hard: tumour share of tissue per positive slide, log-uniform in [LOW, HIGH]",
    )

    ingest = commands.add_parser(
        "ingest", parents=[common], help="slides → tissue → tiles → WebDataset shards"
    )
    ingest.add_argument("--slides", required=True, help="slide prefix (dir or s3://) or slide-list CSV")
    ingest.add_argument("--out", required=True, help="output root (dir or s3://)")
    ingest.add_argument("--labels", help="labels CSV/Parquet (slide_id,label); checked against the slides")
    ingest.add_argument("--strict", action="store_true", help="exit non-zero when any slide failed")
    _tiling_flags(ingest)

    run = commands.add_parser("run", parents=[common], help="ingest + embed in one pass (tiles read once)")
    run.add_argument("--slides", required=True, help="slide prefix (dir or s3://) or slide-list CSV")
    run.add_argument("--out", required=True, help="output root (dir or s3://)")
    run.add_argument("--encoder", required=True, help=ENCODER_HELP)
    run.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    run.add_argument("--labels", help="labels CSV/Parquet (slide_id,label); checked against the slides")
    run.add_argument("--strict", action="store_true", help="exit non-zero when any slide failed")
    _views_flag(run)
    _tiling_flags(run)

    embed = commands.add_parser("embed", parents=[common], help="features for a new encoder from shards")
    embed.add_argument("--out", required=True, help="output root holding committed tile shards")
    embed.add_argument("--encoder", required=True, help=ENCODER_HELP)
    embed.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    embed.add_argument("--strict", action="store_true", help="exit non-zero when any slide failed")
    _views_flag(embed)
    _tiling_flags(embed)

    watch = commands.add_parser(
        "watch",
        parents=[common],
        help="keep OUT in step with a growing slide prefix: new slides are ingested and embedded",
    )
    watch.add_argument("--slides", required=True, help="slide prefix (dir or s3://) to watch")
    watch.add_argument("--out", required=True, help="output root (dir or s3://); one watcher per root")
    watch.add_argument("--encoder", required=True, help=ENCODER_HELP)
    watch.add_argument("--weights", required=True, help=WEIGHTS_HELP)
    watch.add_argument("--interval", type=float, help="seconds between polls (watch.interval_s)")
    watch.add_argument(
        "--model", dest="score_run", help="a trained run (OUT/runs/NAME): score each new slide with it"
    )
    watch.add_argument("--json-status", help="where the JSON status goes (default: OUT/watch/status.json)")
    _tiling_flags(watch)

    encoders = commands.add_parser(
        "encoders", parents=[common], help="the preset tile encoders: dims, tiling, size, licence"
    )
    encoders.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")

    status = commands.add_parser("status", parents=[common], help="per-slide state of an output root")
    status.add_argument("--out", required=True)
    status.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--format",
        dest="fmt",
        choices=STATUS_FORMATS,
        help="table (default), json (= --json), or every ledger column as csv / parquet",
    )
    status.add_argument("--output", help="file for --format csv or parquet (local or s3://; csv: stdout)")
    status.add_argument("--stage", help="ledger stage, e.g. tiles/mpp0.50_px256 (default: from the config)")
    _tiling_flags(status)

    report = commands.add_parser(
        "report",
        parents=[common],
        help="one static HTML page of an output root: cohort, QC thumbnails, runs, sweeps",
    )
    report.add_argument("--out", required=True, help="output root (dir or s3://)")
    report.add_argument("--output", help="where the page goes (default: OUT/report.html)")

    train = commands.add_parser("train", parents=[common], help="train a slide classifier on feature bags")
    train.add_argument(
        "kind",
        choices=list(METHODS),
        help="; ".join(f"{kind}: {method.summary}" for kind, method in METHODS.items()),
    )
    train.add_argument(
        "--name", required=True, help="run name: OUT/runs/NAME (rerun the same name to resume)"
    )
    train.add_argument("--out", required=True, help="output root (dir or s3://)")
    train.add_argument("--features", help="feature-bag directory (default: the only one under OUT/features)")
    train.add_argument(
        "--labels", help="labels CSV/Parquet: slide_id,label[,patient_id][,fold] (all kinds but cdma)"
    )
    train.add_argument(
        "--annotations", help="cdma: dir of <slide_id>.tumour.png masks or <slide_id>.geojson (QuPath)"
    )
    train.add_argument("--model", choices=list(MODELS))
    train.add_argument("--folds", type=int, help="cross-validation folds (train.folds)")
    train.add_argument(
        "--recipe",
        choices=["default", "paper"],
        help="paper: the method's whole published recipe (docs/methods.md); your own settings still win",
    )
    train.add_argument(
        "--workers",
        type=_workers,
        help="Ray Train workers per fold; 0: in-process; auto (default): 0 without GPUs",
    )
    train.add_argument("--epochs", type=int, help="maximum epochs (train.epochs)")
    train.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (train.seeds)")
    train.add_argument(
        "--teacher-init", help="MHIM teacher: auto (train the baseline first), none, or a path"
    )
    train.add_argument("--rounds", type=int, default=1, help="ICMIL rounds after round 0 (default 1)")
    train.add_argument("--encoder", help="ICMIL: the starting tile encoder (e.g. resnet50_trunc)")
    train.add_argument("--weights", help="ICMIL: its local weights file, or 'random' (explicitly)")
    train.add_argument(
        "--export",
        action="store_true",
        help="gigassl: no training, export per-slide embeddings of the finished run NAME for --features",
    )

    tune = commands.add_parser("tune", parents=[common], help="hyperparameter sweep (Ray Tune, ASHA)")
    tune.add_argument(
        "kind",
        choices=TUNABLE,
        help="; ".join(f"{kind}: {METHODS[kind].tune_summary}" for kind in TUNABLE),
    )
    tune.add_argument("--name", required=True, help="sweep name: OUT/tune/NAME (rerun to resume)")
    tune.add_argument("--out", required=True, help="output root (dir or s3://)")
    tune.add_argument("--space", required=True, help="search space YAML: config key → distribution")
    tune.add_argument("--trials", type=int, default=4, help="samples drawn from the space (× grid values)")
    tune.add_argument(
        "--features",
        help="feature-bag directory (default: the only one under OUT/features; gigassl: OUT/gigassl)",
    )
    tune.add_argument("--labels", help="labels CSV/Parquet (mil, mhim, gigassl)")
    tune.add_argument("--annotations", help="cdma: dir of <slide_id>.tumour.png masks or <slide_id>.geojson")
    tune.add_argument("--model", choices=list(MODELS))
    tune.add_argument(
        "--workers",
        type=_workers,
        help="Ray Train workers per trial (0: the trial trains itself, per-epoch ASHA)",
    )
    tune.add_argument("--epochs", type=int, help="maximum epochs per trial (train/gigassl/cdma.epochs)")
    tune.add_argument("--recipe", choices=["default", "paper"], help="the recipe the trials start from")

    probe = commands.add_parser("probe", parents=[common], help="linear probe of slide embeddings (AUC)")
    probe.add_argument("--embeddings", required=True, help="Parquet slide_id, embedding (train gigassl)")
    probe.add_argument("--labels", required=True, help="labels CSV/Parquet (slide_id,label)")
    probe.add_argument("--baseline-features", help="feature bags whose mean-pooled tiles are the baseline")
    probe.add_argument(
        "--sizes", default="20,50", help="small training-set sizes besides the full one (default 20,50)"
    )
    probe.add_argument("--repeats", type=int, default=20, help="repeated stratified splits (default 20)")
    probe.add_argument("--test-frac", type=float, default=0.3, help="test part of each split (default 0.3)")
    probe.add_argument("--output", help="directory for probe.json and embedding_map.png (default: beside)")
    probe.add_argument(
        "--scale",
        choices=SCALES,
        default=SCALES[0],
        help="standardise each embedding dimension on the training part (default), or none: the official "
        "probe on the raw embeddings",
    )

    predict = commands.add_parser("predict", parents=[common], help="apply a trained run to feature bags")
    predict.add_argument("--run", required=True, help="the run directory, OUT/runs/NAME")
    predict.add_argument("--features", required=True, help="feature-bag directory")
    predict.add_argument("--output", help="where predictions (and heatmaps) go (default: RUN/predict)")
    predict.add_argument("--heatmaps", action="store_true", help="attention heatmaps over slide thumbnails")
    predict.add_argument("--slides", help="slide prefix or list for the heatmaps (default: from the ledger)")

    pretrain = commands.add_parser(
        "pretrain-encoder",
        parents=[common],
        help="train a small tile encoder on synthetic tissue (for --encoder resnet10t_64, or cdma.weights)",
    )
    pretrain.add_argument("--out", required=True, help="weights file to write (a JSON record goes beside it)")
    pretrain.add_argument(
        "--encoder",
        default="resnet10t_64",
        choices=["resnet10t_64", "resnet18_64"],
        help="resnet10t_64: 512-d tile features (default); resnet18_64: also the light CDMA encoder",
    )
    pretrain.add_argument("--slides", type=int, default=24, help="synthetic slides to draw tiles from")
    pretrain.add_argument("--tiles-per-slide", type=int, default=96)
    pretrain.add_argument("--epochs", type=int, default=4)
    pretrain.add_argument(
        "--seed", type=int, default=1000, help="the pretraining cohort's seed (keep evaluation cohorts apart)"
    )
    pretrain.add_argument(
        "--contrastive",
        type=float,
        default=0.0,
        help="weight of a tile-level NT-Xent term (two augmentations of a tile agree); 0: supervised only",
    )

    submit = commands.add_parser(
        "submit",
        parents=[common],
        help="run a command on a Ray cluster as a Ray job: slidestream submit [options] -- <command …>",
        description="Submits COMMAND as a Ray job (the project as working dir, storage variables passed "
        "through), follows its logs and exits with its exit code. --address is the cluster's dashboard "
        "(default: RAY_ADDRESS, else http://127.0.0.1:8265).",
    )
    submit.add_argument("--no-wait", action="store_true", help="submit, print the job id and return")
    submit.add_argument("--job-id", help="submission id for the job (default: generated by Ray)")
    submit.add_argument(
        "--gpus", type=int, default=0, help="ask the autoscaler for N GPUs and wait for them before starting"
    )
    submit.add_argument(
        "--cpus", type=int, default=0, help="ask the autoscaler for N CPUs and wait for them before starting"
    )
    submit.add_argument(
        "--wait-nodes-s", type=float, default=900, help="how long --gpus/--cpus wait for nodes (seconds)"
    )
    submit.add_argument(
        "--no-working-dir",
        action="store_true",
        help="do not upload the project: the nodes run the slidestream they have installed",
    )
    submit.add_argument(
        "--no-credentials",
        action="store_true",
        help="pass only the endpoint/region, not the access keys (the cluster has its own role/identity)",
    )
    submit.add_argument(
        "job_command", nargs=argparse.REMAINDER, metavar="COMMAND", help="-- then the command to run"
    )
    return parser


# The demo runs on 2 CPU cores in minutes: smaller tiles and encoder input (`--set` still wins).
DEMO_DEFAULTS = (
    "tiling.tile_px=128",
    "embed.input_px=64",
    "train.folds=2",
    "train.epochs=25",
    "train.min_epochs=10",
    "train.patience=10",
)


def _config_from(args: argparse.Namespace) -> Config:
    overrides = [*(DEMO_DEFAULTS if args.command == "demo" else ()), *args.overrides]
    flag_keys = {
        "mpp": "tiling.mpp",
        "tile_px": "tiling.tile_px",
        "mpp_override": "tiling.mpp_override",
        "address": "ray.address",
        "model": "train.model",
        "folds": "train.folds",
        "workers": "train.workers",
        "epochs": "train.epochs",
        "teacher_init": "train.mhim.teacher_init",
        "annotations": "cdma.annotations",
        "interval": "watch.interval_s",
    }
    if kind := getattr(args, "kind", None):  # these flags set the method's own section
        section = METHODS[kind].section
        flag_keys.update(
            workers=f"{section}.workers", epochs=f"{section}.epochs", recipe=METHODS[kind].recipe_key
        )
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    if getattr(args, "seeds", None):
        overrides.append(f"train.seeds=[{args.seeds}]")
    return load_config(args.config_file, overrides)


def _command(name: str) -> Callable[..., int]:
    """The function of a command, imported late: `--help` should not pay for Ray and torch."""
    if name == "submit":
        from slidestream.submit import submit

        return submit
    if name in ("status", "report"):
        from slidestream import output_commands

        return getattr(output_commands, f"cmd_{name}")
    from slidestream import commands

    return getattr(commands, f"cmd_{name.replace('-', '_')}")


def _call(command: Callable[..., int], args: argparse.Namespace, config: Config) -> int:
    """Calls `command` with the parsed flags its keyword-only parameters name (and the config, when
    it takes one): the commands see typed arguments, never the Namespace."""
    parameters = inspect.signature(command).parameters
    flags = {name: getattr(args, name) for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    return command(config, **flags) if "config" in parameters else command(**flags)


# Flags that name data locations: each object-storage one is checked before the command starts.
STORAGE_FLAGS = (
    "slides",
    "out",
    "labels",
    "features",
    "annotations",
    "embeddings",
    "baseline_features",
    "run",
    "score_run",
    "output",
    "space",
    "json_status",
)


def _check_storage(args: argparse.Namespace) -> None:
    """Unusable credentials, a missing bucket or an unreachable endpoint: one line before any work (and
    before Ray starts). `submit` checks nothing here: its command runs on the cluster, with the cluster's
    identity where --no-credentials says so."""
    if args.command == "submit":
        return
    from slidestream.cluster.storage_errors import check_storage

    for flag in STORAGE_FLAGS:
        value = getattr(args, flag, None)
        if isinstance(value, str):
            check_storage(value)


# Commands whose --out is an output root: their log file goes to OUT/logs/.
LOGGED_UNDER_OUT = ("demo", "ingest", "run", "embed", "watch", "train", "tune")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = getattr(args, "out", None) if args.command in LOGGED_UNDER_OUT else None
    with console(args.command, out, args.verbose) as log_file:
        try:
            config = _config_from(args)
            _check_storage(args)
            code = _call(_command(args.command), args, config)
            log_file.ran = True
        except ConfigError as exc:
            print(f"slidestream: {exc}", file=sys.stderr)
            return exc.exit_code
        except SlidestreamError as exc:  # what the user can fix: one line; anything else: its traceback
            print(f"slidestream {args.command}: {scrub_secrets(str(exc))}", file=sys.stderr)
            return exc.exit_code
    if out:
        print(f"log: {log_file.where}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
