"""The read side of the tile shards: what a run committed, per slide (its shards, its mpp).

Readers (embedding from shards, the trainers that stream tiles) open only what the ledger committed;
the writer is `pipelines/ingest.py`.
"""

from __future__ import annotations

from slidestream.cluster.config import TilingConfig
from slidestream.cluster.storage import join
from slidestream.pipelines.ledger import Ledger, LedgerEntry


def tiles_stage(tiling: TilingConfig) -> str:
    """The ledger stage (and folder under OUT) of the tiles of one tiling."""
    return f"tiles/{tiling.key}"


def committed_tiles(out: str, tiling: TilingConfig) -> dict[str, LedgerEntry]:
    """The committed ledger entry (shards, n_tiles, mpp, …) of every slide ingested without error."""
    return {e.slide_id: e for e in Ledger(out).entries(tiles_stage(tiling)) if e.status == "ok"}


def committed_shards(out: str, tiling: TilingConfig) -> dict[str, list[str]]:
    """URIs of the committed shards per ingested slide: what readers of the tiles should open."""
    stage_uri = join(out, tiles_stage(tiling))
    return {
        slide_id: [join(stage_uri, name) for name in entry.shards]
        for slide_id, entry in committed_tiles(out, tiling).items()
    }


def slide_mpps(out: str, tiling: TilingConfig) -> dict[str, float]:
    """Level-0 µm/px of every committed slide of the tiling."""
    return {slide_id: float(e.mpp or 0.0) for slide_id, e in committed_tiles(out, tiling).items()}
