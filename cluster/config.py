"""The configuration model: `ray_config.yaml` (or `--config FILE`) plus `--set a.b=value` overrides.

Every section is a strict pydantic model, so an unknown key or a bad value fails with a message that
names the dotted key. The model's defaults and the shipped `ray_config.yaml` are kept equal by a test.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.recipes import Recipe, recipe_values

DEFAULT_CONFIG_NAME = "ray_config.yaml"
LabelledSlides = Literal["stratified", "foreground"]  # cdma.labelled_slides
ExportBN = Literal["recalibrate", "running"]  # gigassl.export_bn


class ConfigError(SlidestreamError, ValueError):
    """A configuration file or override that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Section):
    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    object_store_mb: int = Field(default=1024, ge=64)
    data_memory_mb: int = Field(default=512, ge=16)


class TilingConfig(_Section):
    mpp: float = Field(default=0.5, gt=0)
    tile_px: int = Field(default=256, ge=16, le=4096)
    overlap_px: int = Field(default=0, ge=0)
    min_tissue_frac: float = Field(default=0.25, ge=0, le=1)
    mpp_override: float | None = Field(default=None, gt=0)

    @field_validator("overlap_px")
    @classmethod
    def _overlap_below_tile(cls, value: int, info: Any) -> int:
        tile_px = info.data.get("tile_px")
        if tile_px is not None and value >= tile_px:
            raise ValueError(f"overlap_px ({value}) must be smaller than tile_px ({tile_px})")
        return value

    @property
    def key(self) -> str:
        """Directory name that keeps outputs of different tilings apart, e.g. `mpp0.50_px256`."""
        key = f"mpp{self.mpp:.2f}_px{self.tile_px}"
        return key + (f"_ov{self.overlap_px}" if self.overlap_px else "")


class TissueConfig(_Section):
    mask_mpp: float = Field(default=8.0, gt=0)
    min_saturation: float = Field(default=0.025, ge=0, le=1)
    otsu_scale: float = Field(default=0.25, ge=0, le=2)
    max_value_black: float = Field(default=0.15, ge=0, le=1)
    exclude_pen: bool = True
    closing_um: float = Field(default=32.0, ge=0)
    opening_um: float = Field(default=16.0, ge=0)
    min_object_um2: float = Field(default=20000.0, ge=0)
    fill_holes_um2: float = Field(default=40000.0, ge=0)


class ShardConfig(_Section):
    image_format: Literal["jpg", "png"] = "jpg"
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    max_tiles: int = Field(default=1024, ge=1)
    max_mb: float = Field(default=64, gt=0)


class IngestConfig(_Section):
    read_cpus: float = Field(default=1.0, gt=0)
    plan_cpus: float = Field(default=0.5, gt=0)
    # Slides per Ray Data dataset: the driver holds one window's blocks at a time (the encoder actors
    # are started again per window, so not too small).
    window_slides: int = Field(default=2000, ge=1)
    slide_extensions: list[str] = Field(
        default_factory=lambda: [
            *(".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff"),  # tiffslide
            ".dcm",  # DICOM-WSI instances, one slide per folder (wsidicom)
            *(".mrxs", ".vms", ".vmu", ".svslide"),  # OpenSlide, an optional extra
        ]
    )


class EmbedConfig(_Section):
    actors: int = Field(default=1, ge=1)  # fixed pool size (the default pool would be unbounded)
    actor_cpus: float = Field(default=1.0, gt=0)
    actor_gpus: float = Field(default=1.0, ge=0)  # used only when the cluster has GPUs
    batch_size: int = Field(default=64, ge=1)
    dtype: Literal["float16", "float32"] = "float16"
    seed: int = 0  # initialisation seed when weights are "random"
    input_px: int | None = Field(default=None, ge=16)  # override the encoder's input size (light CPU runs)
    cpu_threads: int | None = Field(default=None, ge=1)  # torch threads of a CPU actor (None: cores ÷ actors)
    # The tasks that feed the actors (read, decode) run at idle CPU priority (`pipelines.priority`);
    # false: normal priority, for a machine whose other work should not starve the run.
    feed_at_idle_priority: bool = True


class WatchConfig(_Section):
    interval_s: float = Field(default=10.0, gt=0)  # seconds between polls of the slide prefix
    lock_ttl_s: float = Field(default=120.0, gt=0)  # a writer lock not refreshed for this long is stale
    max_backoff_s: float = Field(default=300.0, gt=0)  # longest wait after storage errors
    status_every_s: float = Field(default=2.0, ge=0)  # JSON status written at most this often


class MHIMConfig(_Section):
    """MHIM-MIL options. A null value comes from the preset; `preset: auto` is the paper's CAMELYON16
    recipe for the model (C16-ABMIL for models without one of their own)."""

    preset: str = "auto"  # auto, C16-ABMIL, C16-TransMIL or TCGA-ABMIL
    mask_ratio: float | None = Field(default=None, ge=0, le=1)  # random drop ratio r
    mask_ratio_l: float | None = Field(default=None, ge=0, le=1)  # low-score drop ratio l
    mask_ratio_h: float | None = Field(default=None, ge=0, le=1)  # high-score drop ratio h
    mask_ratio_hr: float | None = Field(default=None, gt=0, le=1)  # h is drawn from the top h/hr
    mask_ratio_h_decay: bool | None = None  # cosine decay of h to 0 over training
    alpha: float | None = Field(default=None, ge=0)  # weight of the consistency loss
    tau_s: float | None = Field(default=None, gt=0)
    tau_t: float | None = Field(default=None, gt=0)
    momentum: float | None = Field(default=None, ge=0, le=1)  # EMA momentum of the teacher
    momentum_cosine: bool | None = None  # cosine schedule of the momentum to 1.0
    teacher_init: str = "auto"  # auto: train the baseline of the same fold/seed first; none; or a path


Workers = Annotated[int, Field(ge=0)] | Literal["auto"]


class WorkerResources(_Section):
    """The Ray Train workers of a method's training (`trainers.fit.fit_loop`), declared once for the
    sections that train (train, cdma, icmil, gigassl)."""

    # Ray Train workers; 0: in the calling process; auto: 0 without GPUs, else 1 (trainers.fit)
    workers: Workers = 1
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=1.0, ge=0)  # used only when the cluster has GPUs
    max_failures: int = Field(default=2, ge=0)  # worker restarts before the training fails


class TrainConfig(WorkerResources):
    """MIL training and its protocol (folds, validation, seeds, workers). Each fold gets `workers`
    workers and `max_failures` restarts."""

    recipe: Recipe = "default"  # paper: the MHIM-MIL paper's recipe (cluster.recipes, docs/methods.md)
    workers: Workers = "auto"  # per fold; see WorkerResources

    model: Literal["abmil", "transmil", "dsmil", "clam_sb", "dtfd", "maxpool"] = "abmil"
    model_options: dict[str, Any] = Field(default_factory=dict)  # e.g. {gated: true}
    epochs: int = Field(default=50, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    lr_schedule: Literal["cosine", "constant"] = "cosine"  # per epoch: cosine to 0 over `epochs`, or constant
    weight_decay: float = Field(default=1e-5, ge=0)
    grad_clip: float | None = Field(default=None, gt=0)  # gradient-norm clip per step (null: none)
    # each training step sees its bag's instances in a new random order (off in the papers' code)
    shuffle_instances: bool = False
    # early_stop: the best epoch by `monitor` (stopping after `patience`); fixed_epochs: train `epochs`, keep
    # the last (the papers' protocol; the validation part then only sets the decision threshold)
    selection: Literal["early_stop", "fixed_epochs"] = "early_stop"
    min_epochs: int = Field(default=10, ge=0)  # early_stop: no epoch before this is kept or stopped at
    keep_early_epochs: bool = False  # early_stop: epochs before min_epochs may still be kept (MHIM code)
    patience: int = Field(default=20, ge=1)  # epochs without validation improvement before stopping
    monitor: Literal["val_loss", "val_auc"] = "val_loss"
    folds: int = Field(default=5, ge=2)  # ignored when the labels file has a fold or split column
    val_frac: float = Field(default=0.2, gt=0, lt=1)  # validation part of each training part
    seeds: list[int] = Field(default_factory=lambda: [0])
    protocol: Literal["standard", "c16_reproduction"] = "standard"  # c16_reproduction selects on test
    classes: list[str] | None = None  # class order (binary: [negative, positive]); default: sorted labels
    parallel_folds: int | None = Field(default=None, ge=1)  # null: as many as the cluster's CPUs allow
    cache_mb: int = Field(default=2048, ge=0)  # bags kept in memory per worker
    standardize: bool = True  # centre and scale features by the training part's statistics (see yaml)
    mhim: MHIMConfig = Field(default_factory=MHIMConfig)


class CDMAConfig(WorkerResources):
    """CDMA semi-supervised segmentation: data split, MTNet, losses, SGD schedule, slide inference."""

    recipe: Recipe = "default"  # paper: the CDMA paper's recipe (cluster.recipes, docs/methods.md)

    network: Literal["official", "light"] = "official"  # light: ResNet-18, narrow head (CPU tests, demo)
    weights: str | None = None  # encoder's local ImageNet weights file; "random": random init (null refuses)
    # encoder BatchNorm: frozen (official, keeps ImageNet statistics) or train; auto: train for random weights
    encoder_bn: Literal["auto", "frozen", "train"] = "auto"
    classes: list[str] = Field(default_factory=lambda: ["background", "tumour"], min_length=2)
    annotations: str | None = None  # dir of <slide_id><mask_suffix> mask images / <slide_id>.geojson
    mask_suffix: str = ".tumour.png"
    mask_downsample: float = Field(default=32.0, gt=0)  # level-0 px per mask-image pixel
    labelled_frac: float = Field(default=0.1, gt=0, le=1)  # labelled slides, of the training pool
    # which annotated slides are labelled: stratified by foreground like the other roles, or foreground
    # slides first (background-only ones then train unlabelled; see cdma.data.split_slides)
    labelled_slides: LabelledSlides = "stratified"
    sites: str | None = None  # labels file with a site column: labelled slides are spread over the sites
    test_frac: float = Field(default=0.2, gt=0, lt=1)  # held-out annotated slides for the metrics
    val_slides: int = Field(default=1, ge=0)  # annotated slides for model selection (0: last epoch)
    split_seed: int = 0
    min_tissue_frac: float = Field(default=0.5, ge=0, le=1)  # background tiles below this are dropped
    batch_size: int = Field(default=16, ge=2)  # per worker: half labelled, half unlabelled
    epochs: int = Field(default=150, ge=1)
    steps_per_epoch: int | None = Field(default=None, ge=1)  # null: one pass over the labelled tiles
    lr: float = Field(default=1e-3, gt=0)  # pretrained weights; 2x their biases, 10x/20x new weights/biases
    momentum: float = Field(default=0.9, ge=0, lt=1)
    weight_decay: float = Field(default=5e-4, ge=0)
    milestones: list[int] = Field(default_factory=lambda: [37, 75, 112])  # lr x0.1 at these epochs
    unsup_start_epoch: int = Field(default=15, ge=0)  # KD and entropy terms from this epoch on
    kd_weight: float = Field(default=0.1, ge=0)
    entropy_weight: float = Field(default=0.1, ge=0)
    temperature: float = Field(default=10.0, gt=0)
    noise_std: float = Field(default=0.1, ge=0)
    noise_p: float = Field(default=0.25, ge=0, le=1)
    supervised_baseline: bool = True  # also train the same labelled slides without unlabelled data
    infer_overlap: float = Field(default=0.25, ge=0, lt=1)  # sliding-window overlap at inference
    infer_batch: int = Field(default=16, ge=1)
    seed: int = 0


class ICMILConfig(WorkerResources):
    """ICMIL: the bag classifier (train.*) and the tile embedder trained in turns on one fold split. The
    workers here are those of the embedder's fine-tuning (the classifier's are train.workers)."""

    recipe: Recipe = "default"  # paper: the ICMIL paper's recipe (cluster.recipes, docs/methods.md)

    fold: int = Field(default=0, ge=0)  # which split of the fold plan (first seed) every round uses
    epochs: int = Field(default=1, ge=1)  # embedder fine-tuning epochs per round
    tiles_per_epoch: int | None = Field(default=None, ge=1)  # null: every tile of the training slides
    batch_size: int = Field(default=100, ge=2)  # tiles per step and worker
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    clip: float = Field(default=5.0, gt=0)  # gradient-norm clip of the student reduction + head
    weight_w1: float = Field(default=0.5, ge=0)  # loss_w1 weight (student head consistency)
    weight_w2: float = Field(default=0.5, ge=0)  # loss_w2 weight (student reduction consistency)
    crop_scale_min: float = Field(default=0.5, gt=0, le=1)  # RandomResizedCrop scale range [min, 1]
    val_tiles: int = Field(default=512, ge=1)  # validation tiles for model selection (per epoch)
    confidence: bool = False  # journal version: weight loss_c per tile by |2a - 1|^beta
    beta: float | None = Field(default=None, gt=0)  # null: 6 for abmil, 2 for dtfd
    lr_milestones: list[int] | None = None  # lr ×= lr_gamma at these epochs; null: [100] if confidence
    lr_gamma: float = Field(default=0.2, gt=0, le=1)
    shuffle_buffer: int = Field(default=512, ge=1)  # tiles held per worker for streaming shuffling
    open_shards: int = Field(default=16, ge=1)  # shards (one slide each) a worker reads at once, round-robin


class GigaSSLConfig(WorkerResources):
    """Giga-SSL self-supervised slide embeddings (`slidestream train gigassl`)."""

    recipe: Recipe = "default"  # paper: the Giga-SSL paper's recipe (cluster.recipes, docs/methods.md)

    # training stops after this epoch; 0: no training, the network at its initialisation is exported
    # (the untrained baseline a probe compares a run with)
    epochs: int = Field(default=100, ge=0)
    # length of the warm-up + cosine schedule (≥ epochs); null: epochs. Paper: stop at 1000 of 3000
    schedule_epochs: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=256, ge=2)  # slides per step, the GLOBAL batch split across workers
    n_tiles: int = Field(default=5, ge=1)  # T: tiles per view, drawn from one stored augmentation
    tau: float = Field(default=0.05, gt=0)  # NT-Xent temperature
    lr: float | None = Field(default=None, gt=0)  # null: 0.03 × batch_size / 256
    warmup_epochs: int = Field(default=10, ge=0)  # linear warm-up, then cosine to 0
    optimizer: Literal["adam", "lars"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)  # LARS only
    cell_px: float | None = Field(default=224.0, gt=0)  # level-0 px per map cell (official); null: grid step
    # local torchvision ResNet-18 ImageNet weights for layer4 (the paper), or "random"; null: refused
    init_weights: str | None = None
    dim: int = Field(default=512, ge=1)  # slide embedding size
    proj_dim: int = Field(default=256, ge=1)  # projection size (the loss's space)
    export_chunks: int = Field(default=32, ge=1)  # chunks of T tiles averaged per slide at export
    # BatchNorm at export: training's running statistics (official), or recomputed over the exported slides
    export_bn: ExportBN = "running"
    seed: int = 0
    cache_mb: int = Field(default=2048, ge=0)  # view bags kept in memory per worker


class Config(_Section):
    ray: RayConfig = Field(default_factory=RayConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    gigassl: GigaSSLConfig = Field(default_factory=GigaSSLConfig)
    icmil: ICMILConfig = Field(default_factory=ICMILConfig)
    watch: WatchConfig = Field(default_factory=WatchConfig)
    cdma: CDMAConfig = Field(default_factory=CDMAConfig)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def default_config_path() -> Path | None:
    """`./ray_config.yaml` if present, else the one shipped at the project root, else None."""
    for candidate in (
        Path.cwd() / DEFAULT_CONFIG_NAME,
        Path(__file__).resolve().parents[1] / DEFAULT_CONFIG_NAME,
    ):
        if candidate.is_file():
            return candidate
    return None


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars or flow collections: `0.25`, `null`, `true`, `[.svs, .tif]`."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


_MISSING = object()


def _get_dotted(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where} {key}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    key, sep, value = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    _set_dotted(raw, key, _parse_scalar(value), "--set")


def with_values(config: Config, values: dict[str, Any], where: str = "setting") -> Config:
    """A copy of `config` with dotted keys set to (already parsed) values, validated like `--set`."""
    raw = config.model_dump(mode="json")
    for key, value in values.items():
        _set_dotted(raw, key, value, where)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<root>"
        lines.append(f"  {where}: {item['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def _apply_recipes(raw: dict[str, Any], requested: dict[str, Any]) -> None:
    """Sets the settings of each requested `paper` recipe that `raw` leaves absent or at its default."""
    sections = {
        name: section.get("recipe", "default")
        for name, section in requested.items()
        if isinstance(section, dict)
    }
    defaults = Config().model_dump(mode="json")
    for key, value in recipe_values(sections).items():
        if _get_dotted(raw, key) in (_MISSING, _get_dotted(defaults, key)):
            _set_dotted(raw, key, value, "recipe")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (default: `default_config_path()`), apply `key=value` overrides, validate."""
    raw: dict[str, Any] = {}
    source = Path(path) if path is not None else default_config_path()
    if source is not None:
        if not source.is_file():
            raise ConfigError(f"config file not found: {source}")
        try:
            loaded = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {source} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {source} must hold a mapping at the top level")
        raw = loaded
    requested = copy.deepcopy(raw)  # the file with the overrides: which recipes are asked for
    for assignment in overrides:
        _apply_override(requested, assignment)
    _apply_recipes(raw, requested)
    for assignment in overrides:
        _apply_override(raw, assignment)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
