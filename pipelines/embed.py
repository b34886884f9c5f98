"""The embedding stage: tiles from the ingest stream → a fixed pool of encoder actors → one feature bag
(Parquet) per slide under `OUT/features/<encoder-key>-<tiling-key>/`.

Each actor writes the features of one chunk as a part file with a deterministic name (a retried chunk
overwrites its part); when every chunk of a slide is in, the driver streams the parts into the slide's
bag, deletes them, and commits the bag in the same ledger commit as the slide's shards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import ray

from cluster.config import EmbedConfig, TilingConfig
from cluster.storage import filesystem, join, scrub_secrets
from pipelines.features import BagMeta, ParquetBagWriter, bag_table, write_bag
from pipelines.ledger import Ledger, LedgerEntry
from pipelines.reader import classify
from pipelines.slides import SlideRef

EMBED_VERSION = "embed-1"
_PARTS = "_parts"


def features_stage(encoder_key: str, tiling: TilingConfig) -> str:
    return f"features/{encoder_key}-{tiling.key}"


def _part_name(slide_id: str, fingerprint: str, chunk: int) -> str:
    digest = hashlib.sha1(fingerprint.encode()).hexdigest()[:8]
    return f"{slide_id}-{digest}-{chunk:05d}.parquet"


def with_input_px(info: Any, input_px: int | None) -> Any:
    """Encoder info at a non-default input size; the key says so, since the features differ."""
    if not input_px or input_px == info.input_px:
        return info
    return replace(info, input_px=input_px, key=f"{info.key}-in{input_px}")


class EmbedActor:
    """Holds one encoder (on the GPU when the actor has one) and embeds one chunk of tiles per call."""

    def __init__(self, name: str, weights: str, seed: int, parts_uri: str, meta: BagMeta, cfg: EmbedConfig):
        import torch

        from pipelines.encoders import build_encoder

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = build_encoder(name, weights, seed).to(self.device)
        self.encoder.info = with_input_px(self.encoder.info, cfg.input_px)
        self.parts_uri, self.meta, self.cfg = parts_uri, meta, cfg

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        pixels = row.pop("pixels")
        row["part"] = ""
        if row["error"] or len(pixels) == 0:
            return row
        try:
            features = self.encoder.embed(pixels, device=self.device, batch_size=self.cfg.batch_size)
            table = bag_table(
                np.asarray(row["xs"]), np.asarray(row["ys"]), features, self.meta, dtype=self.cfg.dtype
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
    out: str = ""
    info: Any = field(init=False)

    def __post_init__(self) -> None:
        from pipelines.encoders import encoder_info

        self.info = with_input_px(
            encoder_info(self.encoder_name, self.weights, self.cfg.seed), self.cfg.input_px
        )

    @property
    def stage(self) -> str:
        return features_stage(self.info.key, self.tiling)

    @property
    def input_px(self) -> int:
        return self.info.input_px

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

    def attach(self, dataset: ray.data.Dataset) -> ray.data.Dataset:
        gpus = self.cfg.actor_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
        meta = BagMeta(
            encoder=self.info.key,
            dim=self.info.dim,
            mpp=self.tiling.mpp,
            tile_px=self.tiling.tile_px,
            code_version=EMBED_VERSION,
        )
        return dataset.map(
            EmbedActor,
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
                entry.status, entry.n_tiles = "ok", tiles.n_tiles
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
