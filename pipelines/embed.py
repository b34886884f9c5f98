"""The embedding stage: tiles from the ingest stream → a fixed pool of encoder actors → one feature bag
(Parquet) per slide under `OUT/features/<encoder-key>-<tiling-key>/`.

Each actor writes the features of one chunk as a part file with a deterministic name (a retried chunk
overwrites its part); when every chunk of a slide is in, the driver streams the parts into the slide's
bag, deletes them, and commits the bag in the same ledger commit as the slide's shards.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray

from slidestream.cluster.config import Config, EmbedConfig, TilingConfig
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import filesystem, join, scrub_secrets
from slidestream.pipelines.features import BagMeta, ParquetBagWriter, bag_table, write_bag
from slidestream.pipelines.formats.errors import classify
from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.pipelines.priority import at_idle_priority
from slidestream.pipelines.reader import resize_tile
from slidestream.pipelines.shards import decode_sample, iter_shard_samples, tile_position
from slidestream.pipelines.slides import SlideRef, version_digest
from slidestream.pipelines.stream import IngestReport, SlideProgress, commit_slides, no_fusion, windows
from slidestream.pipelines.tile_store import committed_tiles, shard_uris

EMBED_VERSION = "embed-1"
_PARTS = "_parts"


def features_stage(encoder_key: str, tiling: TilingConfig) -> str:
    return f"features/{encoder_key}-{tiling.key}"


def _part_name(slide_id: str, fingerprint: str, chunk: int) -> str:
    return f"{slide_id}-{version_digest(fingerprint)}-{chunk:05d}.parquet"


def cpu_threads(cfg: EmbedConfig) -> int:
    """Torch threads for an encoder actor on CPU. Ray would give it `actor_cpus` threads, but decoding
    tiles takes a few percent of the encoder's time, so by default the actors share all the node's cores."""
    return cfg.cpu_threads or max(1, (os.cpu_count() or 1) // cfg.actors)


def with_input_px(info: Any, input_px: int | None) -> Any:
    """Encoder info at a non-default input size (tiles resized straight to it, no crop); the key says so,
    since the features differ."""
    if not input_px or input_px == info.input_px:
        return info
    return replace(info, input_px=input_px, resize_px=0, key=f"{info.key}-in{input_px}")


class EmbedActor:
    """Holds one encoder (on the GPU when the actor has one) and embeds one chunk of tiles per call."""

    def __init__(self, name: str, weights: str, seed: int, parts_uri: str, meta: BagMeta, cfg: EmbedConfig):
        import torch

        from slidestream.pipelines.encoders import build_encoder

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads(cfg))
        self.encoder = build_encoder(name, weights, seed).to(self.device)
        self.encoder.info = with_input_px(self.encoder.info, cfg.input_px)
        self.parts_uri, self.meta, self.cfg = parts_uri, meta, cfg

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        pixels = np.require(row.pop("pixels"), requirements="W")  # Ray hands out read-only arrays
        row["part"] = ""
        if row["error"] or len(pixels) == 0:
            return row
        try:
            features = self.encoder.embed(pixels, device=self.device, batch_size=self.cfg.batch_size)
            aug = np.full(len(features), row["aug"]) if "aug" in row else None
            table = bag_table(
                np.asarray(row["xs"]),
                np.asarray(row["ys"]),
                features,
                self.meta,
                aug=aug,
                dtype=self.cfg.dtype,
            )
            name = _part_name(row["slide_id"], row["fingerprint"], row["chunk"])
            write_bag(join(self.parts_uri, name), table)
            row["part"] = name
        except Exception as exc:
            error = classify("cannot embed tiles", exc)
            row.update(error=error.reason, permanent=error.permanent)
        return row


@dataclass
class EmbedStage:
    """What `run_ingest` needs to also embed: the actor pool, and how a slide's bag is committed."""

    encoder_name: str
    weights: str
    tiling: TilingConfig
    cfg: EmbedConfig
    views: tuple[int, int] | None = None  # Giga-SSL (NAUG, NT): bags of augmented views instead of features
    out: str = ""
    info: Any = field(init=False)

    def __post_init__(self) -> None:
        from slidestream.pipelines.encoders import check_encoder, encoder_info

        self.info = with_input_px(
            encoder_info(self.encoder_name, self.weights, self.cfg.seed), self.cfg.input_px
        )
        check_encoder(self.info)  # a wrong weights file fails before any slide is read

    @property
    def stage(self) -> str:
        if self.views is None:
            return features_stage(self.info.key, self.tiling)
        naug, nt = self.views
        return f"gigassl/{self.info.key}-{self.tiling.key}-v{naug}x{nt}"

    @property
    def input_px(self) -> int:
        """The side tiles reach the encoder at, before its centre crop (if it has one)."""
        return self.info.feed_px

    def on_gpu(self) -> bool:
        """Whether the encoder actors get a GPU: the cluster (Ray must be up) has one and they ask for it."""
        return self.cfg.actor_gpus > 0 and ray.cluster_resources().get("GPU", 0) > 0

    def feed_px(self) -> int:
        """The side at which feeding tasks hand tiles to the actors. A GPU actor resizes them itself (on the
        device, antialiased bilinear): on the CPU that resize costs more than decoding a JPEG tile, and
        the cores are what feeding a GPU runs short of. A CPU actor gets them at its input size."""
        return self.tiling.tile_px if self.on_gpu() else self.input_px

    def _stage_uri(self) -> str:
        return join(self.out, self.stage)

    def prepare(self, out: str, ledger: Ledger) -> None:
        """Remember the output root and delete leftovers of an interrupted run (parts, uncommitted bags)."""
        self.out = out
        fs, root = filesystem(self._stage_uri())
        if not fs.exists(root):
            return
        committed = {f"{e.slide_id}.parquet" for e in ledger.entries(self.stage) if e.status == "ok"}
        for path in fs.find(root):
            name = path.rsplit("/", 1)[-1]
            if f"/{_PARTS}/" in path or (name.endswith(".parquet") and name not in committed):
                fs.rm_file(path)

    def feeding(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` as a task that feeds the encoder actors: at idle CPU priority unless configured not to."""
        return at_idle_priority(fn) if self.cfg.feed_at_idle_priority else fn

    def attach(self, dataset: ray.data.Dataset) -> ray.data.Dataset:
        gpus = self.cfg.actor_gpus if self.on_gpu() else 0
        meta = BagMeta(
            encoder=self.info.key,
            dim=self.info.dim,
            mpp=self.tiling.mpp,
            tile_px=self.tiling.tile_px,
            code_version=EMBED_VERSION,
        )
        return dataset.map(
            EmbedActor,  # type: ignore[arg-type]  # a callable class: Ray's stub lists functions only
            fn_constructor_kwargs={
                "name": self.encoder_name,
                "weights": self.weights,
                "seed": self.cfg.seed,
                "parts_uri": join(self._stage_uri(), _PARTS),
                "meta": meta,
                "cfg": self.cfg,
            },
            compute=ray.data.ActorPoolStrategy(size=self.cfg.actors),
            num_cpus=self.cfg.actor_cpus,
            num_gpus=gpus,
        )

    def complete(self, slide: SlideRef, results: list[dict], tiles: LedgerEntry) -> LedgerEntry:
        """Merge the slide's parts into its bag (or record why not) and return its ledger entry."""
        entry = LedgerEntry(
            stage=self.stage,
            slide_id=slide.slide_id,
            uri=slide.uri,
            size=slide.size,
            etag_or_mtime=slide.fingerprint,
            status="failed",
            error=tiles.error,
            permanent=tiles.permanent,
            mpp=tiles.mpp,
            versions={"embed": EMBED_VERSION, "encoder": self.info.key},
        )
        ordered = sorted(results, key=lambda r: r["chunk"])
        parts = [join(self._stage_uri(), _PARTS, r["part"]) for r in ordered if r.get("part")]
        if tiles.status == "ok":
            try:
                self._merge(parts, join(self._stage_uri(), f"{slide.slide_id}.parquet"))
                entry.status = "ok"
                entry.n_tiles = tiles.n_tiles if self.views is None else sum(r["n_tiles"] for r in results)
                entry.shards = [f"{slide.slide_id}.parquet"]
            except Exception as exc:
                error = classify("cannot write the feature bag", exc)
                entry.error, entry.permanent = scrub_secrets(error.reason), error.permanent
        for part in parts:
            fs, path = filesystem(part)
            if fs.exists(path):
                fs.rm_file(path)
        return entry

    @staticmethod
    def _merge(parts: list[str], target: str) -> None:
        import pyarrow.parquet as pq

        writer = None
        for part in parts:
            fs, path = filesystem(part)
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle)
            if writer is None:
                writer = ParquetBagWriter(target, table.schema)
            writer.write(table)
        if writer is None:
            raise ValueError("no feature parts to merge")
        writer.close()


# ------------------------------------------------------------------------------------ from shards


def read_shard_tiles(row: dict[str, Any], px: int) -> dict[str, Any]:
    """Decode the tiles of one committed shard (no slide access) into the row the encoder actors take,
    resized to `px` (`EmbedStage.feed_px`)."""
    xs, ys, pixels = [], [], []
    row.update(error="", permanent=True, shards=[], shard_bytes=0)
    try:
        for sample in iter_shard_samples(row["shard"]):
            x, y = tile_position(sample["__key__"])
            tile = decode_sample(sample)
            xs.append(x)
            ys.append(y)
            pixels.append(tile if tile.shape[0] == px else resize_tile(tile, px))
    except Exception as exc:
        error = classify(f"cannot read shard {row['shard'].rsplit('/', 1)[-1]}", exc)
        row.update(error=error.reason, permanent=error.permanent)
        xs, ys, pixels = [], [], []
    row.update(xs=xs, ys=ys, n_tiles=len(xs))
    row["pixels"] = np.stack(pixels) if pixels else np.zeros((0, px, px, 3), np.uint8)
    return row


def make_views(row: dict[str, Any], views: tuple[int, int], input_px: int, seed: int) -> list[dict[str, Any]]:
    """One row per Giga-SSL augmentation of a slide: NT tiles drawn with replacement from its committed
    shards, all augmented with one parameter draw (`slidestream.pipelines.gigassl_views`)."""

    # Imported here: torchvision is needed only by the tasks that make views.
    from slidestream.pipelines.gigassl_views import apply_view, draw_params, sample_views, slide_rng

    naug, nt = views
    base = {k: row[k] for k in ("slide_id", "fingerprint", "node_id")}
    base.update(n_chunks=naug, error="", permanent=True, shards=[], shard_bytes=0)
    try:
        rng = slide_rng(seed, row["slide_id"])
        picks = sample_views(row["n_tiles"], naug, nt, rng)
        needed = set(np.concatenate(picks).tolist())
        kept: dict[int, dict] = {}  # only the sampled tiles' (still encoded) samples are held
        samples = (s for uri in row["shard_uris"] for s in iter_shard_samples(uri))
        for index, sample in enumerate(samples):
            if index in needed:
                kept[index] = sample
        rows = []
        for aug, chosen in enumerate(picks):
            params = draw_params(rng)
            tiles = np.stack([decode_sample(kept[i]) for i in chosen])
            coords = [tile_position(kept[i]["__key__"]) for i in chosen]
            rows.append(
                {
                    **base,
                    "chunk": aug,
                    "aug": aug,
                    "xs": [c[0] for c in coords],
                    "ys": [c[1] for c in coords],
                    "n_tiles": nt,
                    "pixels": apply_view(tiles, params, input_px),
                }
            )
        return rows
    except Exception as exc:
        error = classify("cannot make Giga-SSL views", exc)
        empty = np.zeros((0, input_px, input_px, 3), np.uint8)
        return [
            {
                **base,
                "chunk": -1,
                "n_chunks": 0,
                "aug": -1,
                "xs": [],
                "ys": [],
                "n_tiles": 0,
                "pixels": empty,
                "error": error.reason,
                "permanent": error.permanent,
            }
        ]


def run_embed(out: str, config: Config, embed: EmbedStage, progress_callback: Any = None) -> IngestReport:
    """Features (or, with `embed.views`, Giga-SSL view bags) for `embed`'s encoder from the committed
    shards of `out`; slides are not touched.

    Slides whose bag for this stage is already committed for the same slide version are skipped.
    """
    started = time.monotonic()
    ledger = Ledger(out)
    state = ledger.state()
    report = IngestReport(stage=embed.stage, out=out)
    embed.prepare(out, ledger)
    tiles = committed_tiles(ledger, config.tiling)
    shards = {sid: shard_uris(out, config.tiling, entry) for sid, entry in tiles.items()}
    report.discovered = len(tiles)
    todo = []
    for slide_id, entry in tiles.items():
        done = state.get((embed.stage, slide_id))
        if done is not None and done.status == "ok" and done.etag_or_mtime == entry.etag_or_mtime:
            continue
        todo.append(slide_id)
    report.skipped_unchanged = len(tiles) - len(todo)
    if todo:
        ensure_ray(config.ray)
        progress = {sid: SlideProgress(_slide_ref(tiles[sid])) for sid in todo}

        def entries_of(slide: SlideProgress) -> list[LedgerEntry]:
            tiles_entry = tiles[slide.slide.slide_id]
            if errors := [r["error"] for r in slide.results if r["error"]]:
                tiles_entry = replace(tiles_entry, status="failed", error=errors[0])
            return [embed.complete(slide.slide, slide.results, tiles_entry)]

        datasets = (
            _window_dataset(embed, window, tiles, shards, config)
            for window in windows(todo, config.ingest.window_slides)
        )
        commit_slides(datasets, progress, ledger, report, entries_of, progress_callback)
        embed.prepare(out, ledger)
    ledger.compact()
    report.seconds = time.monotonic() - started
    return report


def _window_dataset(
    embed: EmbedStage,
    window: Sequence[str],
    tiles: dict[str, LedgerEntry],
    shards: dict[str, list[str]],
    config: Config,
) -> ray.data.Dataset:
    """One window of slides to embed, as a dataset: a row per shard (tile embedding) or per slide (Giga-SSL
    views, which draw from all its shards)."""
    if embed.views is None:
        rows = [
            {
                "slide_id": sid,
                "fingerprint": tiles[sid].etag_or_mtime,
                "shard": uri,
                "chunk": i,
                "n_chunks": len(shards[sid]),
                "node_id": "",
            }
            for sid in window
            for i, uri in enumerate(shards[sid])
        ]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            embed.feeding(read_shard_tiles),
            fn_kwargs={"px": embed.feed_px()},
            num_cpus=config.ingest.read_cpus,
            ray_remote_args_fn=no_fusion,
        )
    else:
        rows = [
            {
                "slide_id": sid,
                "fingerprint": tiles[sid].etag_or_mtime,
                "shard_uris": shards[sid],
                "n_tiles": tiles[sid].n_tiles,
                "node_id": "",
            }
            for sid in window
        ]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).flat_map(
            embed.feeding(make_views),
            fn_kwargs={"views": embed.views, "input_px": embed.input_px, "seed": embed.cfg.seed},
            num_cpus=config.ingest.read_cpus,
            ray_remote_args_fn=no_fusion,
        )
    dataset = embed.attach(dataset)
    dataset.context.target_max_block_size = 1
    return dataset


def _slide_ref(entry: LedgerEntry) -> SlideRef:
    return SlideRef(entry.slide_id, entry.uri, entry.size, entry.etag_or_mtime)
