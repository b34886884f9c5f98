"""How ledger objects are stored: commits as small JSON documents, snapshots as one Parquet table.

A commit holds the few entries of one slide, written once and read back only until the next snapshot,
so JSON is cheap and easy to inspect. A snapshot holds every entry of an output folder (10^5 slides and
more in an archive): as Parquet it is read in a fraction of the time of the same JSON, is a tenth of the
size, and is a table that DuckDB, pandas or Spark query directly (README, "The ledger"). Snapshots written as
JSON by earlier versions are still read.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from slidestream.cluster.gc_pause import gc_paused

LEDGER_FORMAT = 2  # 1: JSON snapshots; 2: Parquet snapshots
COMMIT_SUFFIX = ".json"
SNAPSHOT_SUFFIX = ".parquet"
LEDGER_SUFFIXES = (".json", ".parquet")
Status = Literal["ok", "failed", "skipped"]


@dataclass(slots=True)
class LedgerEntry:
    stage: str  # e.g. "tiles/mpp0.50_px256"
    slide_id: str
    uri: str
    size: int
    etag_or_mtime: str  # the slide fingerprint the outputs were made from
    status: Status
    error: str | None = None
    permanent: bool = True  # a failed slide with the same fingerprint is not retried when True
    n_tiles: int = 0
    mpp: float | None = None
    backend: str | None = None  # the reader that opened the slide (tiffslide, wsidicom, openslide)
    shards: list[str] = field(default_factory=list)  # paths relative to the stage directory
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    committed_at: float = 0.0

    @property
    def key(self) -> tuple[str, str]:
        return (self.stage, self.slide_id)


SNAPSHOT_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("slide_id", pa.string()),
        ("uri", pa.string()),
        ("size", pa.int64()),
        ("etag_or_mtime", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("permanent", pa.bool_()),
        ("n_tiles", pa.int64()),
        ("mpp", pa.float64()),
        ("backend", pa.string()),
        ("shards", pa.list_(pa.string())),
        ("versions", pa.map_(pa.string(), pa.string())),
        ("extra", pa.string()),  # JSON: its keys differ by stage
        ("committed_at", pa.float64()),
    ],
    metadata={"slidestream_ledger_format": str(LEDGER_FORMAT)},
)
_NESTED = ("shards", "versions", "extra")


def encode_commit(entries: list[LedgerEntry]) -> bytes:
    return json.dumps({"format": LEDGER_FORMAT, "entries": [asdict(e) for e in entries]}, indent=1).encode()


def snapshot_table(entries: list[LedgerEntry]) -> pa.Table:
    """The entries as one Arrow table: a column per `LedgerEntry` field (`SNAPSHOT_SCHEMA`)."""
    names = SNAPSHOT_SCHEMA.names
    columns: dict[str, list[Any]] = {name: [getattr(e, name) for e in entries] for name in names}
    columns["versions"] = [list(v.items()) for v in columns["versions"]]
    columns["extra"] = [json.dumps(x) for x in columns["extra"]]
    return pa.table(columns, schema=SNAPSHOT_SCHEMA)


def encode_snapshot(entries: list[LedgerEntry]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(snapshot_table(entries), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _lists(column: pa.ChunkedArray) -> list[list[Any]]:
    """A list column as Python lists, sliced from one flat list (much faster than `to_pylist`)."""
    array = column.combine_chunks()
    values = array.values.to_pylist()
    offsets = array.offsets.to_pylist()
    return [values[start:end] for start, end in itertools.pairwise(offsets)]


def _maps(column: pa.ChunkedArray) -> list[dict[Any, Any]]:
    """A map column as Python dicts."""
    array = column.combine_chunks()
    keys, items, offsets = array.keys.to_pylist(), array.items.to_pylist(), array.offsets.to_pylist()
    return [dict(zip(keys[a:b], items[a:b], strict=True)) for a, b in itertools.pairwise(offsets)]


def decode(name: str, data: bytes, entry_type: type[LedgerEntry]) -> list[LedgerEntry]:
    """The entries of the ledger object `name` (a JSON commit or snapshot, or a Parquet snapshot)."""
    with gc_paused():
        if not name.endswith(SNAPSHOT_SUFFIX):
            return [entry_type(**entry) for entry in json.loads(data)["entries"]]
        # No Arrow thread pools: a process that exits while their threads idle can abort in their teardown
        # (apache/arrow#34314), and a snapshot decodes fast enough on one thread.
        table = pq.read_table(pa.BufferReader(data), use_threads=False, pre_buffer=False)
        columns: dict[str, list[Any]] = {
            name: table.column(name).to_pylist() for name in SNAPSHOT_SCHEMA.names if name not in _NESTED
        }
        columns["shards"] = _lists(table.column("shards"))
        columns["versions"] = _maps(table.column("versions"))
        columns["extra"] = [json.loads(x) for x in table.column("extra").to_pylist()]
        ordered = [columns[f.name] for f in fields(entry_type)]
        return [entry_type(*row) for row in zip(*ordered, strict=True)]
