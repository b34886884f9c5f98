"""The commands that only read an output root: `status` and `report`.

They import neither Ray nor torch, so that asking what a 100,000-slide run has done costs what reading its
ledger costs (a second), not the seconds of starting a training stack.
"""

from __future__ import annotations

import json
import sys
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pa_csv

from slidestream.cluster.config import Config
from slidestream.cluster.errors import UsageError
from slidestream.cluster.storage import write_bytes_atomic
from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.pipelines.ledger_format import encode_snapshot, snapshot_table
from slidestream.pipelines.tile_store import tiles_stage
from slidestream.report import status_payload, write_report

StatusFormat = Literal["table", "json", "csv", "parquet"]
STATUS_FORMATS = ("table", "json", "csv", "parquet")


def print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=1, sort_keys=False))


def _print_table(out: str, stage: str, payload: dict) -> None:
    print(f"{out} [{stage}]")
    print(f"{'slide_id':<28} {'status':<7} {'reader':<9} {'tiles':>7}  error")
    for slide in payload["slides"]:
        reader = slide["backend"] or "-"
        print(
            f"{slide['slide_id']:<28} {slide['status']:<7} {reader:<9} {slide['n_tiles']:>7}  "
            f"{slide['error'] or ''}"
        )
    totals = payload["totals"]
    print(f"{totals['slides']} slides: {totals['ok']} ok, {totals['failed']} failed, {totals['tiles']} tiles")


def _csv_bytes(entries: list[LedgerEntry]) -> bytes:
    """The ledger's columns as CSV: shard names joined by spaces, versions as JSON."""
    table = snapshot_table(entries)
    flat = {
        "shards": [" ".join(names) for names in table.column("shards").to_pylist()],
        "versions": [json.dumps(dict(pairs)) for pairs in table.column("versions").to_pylist()],
    }
    for name, values in flat.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    sink = pa.BufferOutputStream()
    pa_csv.write_csv(table, sink)
    return sink.getvalue().to_pybytes()


def _export(entries: list[LedgerEntry], fmt: StatusFormat, output: str | None) -> None:
    """The stage's ledger entries, every column, as CSV (to `output` or stdout) or Parquet (to `output`)."""
    if fmt == "parquet" and output is None:
        raise UsageError("status --format parquet writes a file: give it with --output PATH (local or s3://)")
    data = encode_snapshot(entries) if fmt == "parquet" else _csv_bytes(entries)
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        write_bytes_atomic(output, data)
        print(f"{len(entries)} ledger entries → {output}", file=sys.stderr)


def cmd_status(
    config: Config,
    *,
    out: str,
    as_json: bool,
    stage: str | None,
    fmt: StatusFormat | None,
    output: str | None,
) -> int:
    """Per-slide state of one ledger stage: a table, JSON, or every ledger column as CSV / Parquet."""
    if as_json and fmt not in (None, "json"):
        raise UsageError(f"status: --json and --format {fmt} contradict each other; give one of them")
    fmt = "json" if as_json else (fmt or "table")
    if output is not None and fmt not in ("csv", "parquet"):
        raise UsageError(f"status: --output is for --format csv or parquet, not {fmt}")
    stage = stage or tiles_stage(config.tiling)
    entries = Ledger(out).entries(stage)
    if fmt in ("csv", "parquet"):
        _export(entries, fmt, output)
        return 0
    payload = status_payload(entries)
    if fmt == "json":
        print_json({"stage": stage, **payload})
    else:
        _print_table(out, stage, payload)
    return 0


def cmd_report(*, out: str, output: str | None) -> int:
    """One static HTML page of OUT: the cohort per ledger stage (with QC thumbnails), runs and sweeps."""
    target, report = write_report(out, output)
    slides = sum(s.payload["totals"]["slides"] for s in report.stages if s.stage.startswith("tiles/"))
    print(
        f"report of {out}: {slides} slides in {len(report.stages)} ledger stages, {len(report.runs)} runs, "
        f"{len(report.sweeps)} sweeps"
    )
    print(target)
    return 0
