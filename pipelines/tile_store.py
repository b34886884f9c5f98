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


def committed_tiles(ledger: Ledger, tiling: TilingConfig) -> dict[str, LedgerEntry]:
    """The committed ledger entry (shards, n_tiles, mpp, …) of every slide ingested without error."""
    return {e.slide_id: e for e in ledger.entries(tiles_stage(tiling)) if e.status == "ok"}


def shard_uris(out: str, tiling: TilingConfig, entry: LedgerEntry) -> list[str]:
    """URIs of a committed slide's shards: what readers of its tiles should open."""
    stage_uri = join(out, tiles_stage(tiling))
    return [join(stage_uri, name) for name in entry.shards]


def committed_shards(out: str, tiling: TilingConfig) -> dict[str, list[str]]:
    """URIs of the committed shards per ingested slide."""
    return {sid: shard_uris(out, tiling, e) for sid, e in committed_tiles(Ledger(out), tiling).items()}


def slide_mpp(entry: LedgerEntry) -> float:
    """Level-0 µm/px of a committed slide (ingest fails a slide without one, so a missing value means a
    ledger written by something else)."""
    if entry.mpp is None:
        raise ValueError(
            f"slide {entry.slide_id}: committed tiles without an mpp in the ledger ({entry.stage})"
        )
    return float(entry.mpp)
