"""The labels file (CSV or Parquet): `slide_id,label` plus optional `patient_id`, `split`/`fold`."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.storage import read_bytes

REQUIRED = ("slide_id", "label")


class LabelsError(SlidestreamError, ValueError):
    """A labels file that cannot be used; the message names the file and the column or row."""


def read_labels(uri: str) -> pa.Table:
    """Load and validate a labels table; slide ids must be unique and labels present."""
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise LabelsError(f"labels file not found: {uri}") from None
    try:
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
        else:
            options = pacsv.ConvertOptions(
                column_types={"slide_id": pa.string(), "label": pa.string(), "patient_id": pa.string()}
            )
            table = pacsv.read_csv(io.BytesIO(data), convert_options=options)
    except pa.ArrowInvalid as exc:
        raise LabelsError(f"labels file {uri} cannot be parsed: {exc}") from None
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise LabelsError(
            f"labels file {uri} lacks column(s) {', '.join(missing)} (has {table.column_names})"
        )
    slide_ids = table.column("slide_id").to_pylist()
    labels = table.column("label").to_pylist()
    for row, (slide_id, label) in enumerate(zip(slide_ids, labels, strict=True), start=1):
        if not slide_id:
            raise LabelsError(f"labels file {uri} row {row}: empty slide_id")
        if label is None or str(label).strip() == "":
            raise LabelsError(f"labels file {uri} row {row} (slide {slide_id}): empty label")
    seen: set[str] = set()
    for slide_id in slide_ids:
        if slide_id in seen:
            raise LabelsError(f"labels file {uri}: slide_id {slide_id!r} appears more than once")
        seen.add(slide_id)
    return table
