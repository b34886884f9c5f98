"""Per-slide feature bags: the Parquet data contract that the MIL trainers read.

One file per slide at `<root>/<slide_id>.parquet` with columns `x: int32, y: int32` (level-0 pixels of the
tile's top-left corner) and `feature: fixed_size_list<float16|float32>[D]`, plus Parquet key-value metadata
`slidestream.encoder`, `slidestream.dim`, `slidestream.mpp`, `slidestream.tile_px`,
`slidestream.code_version` and `slidestream.format`. A Giga-SSL views file has a leading `aug: int16`
column and is otherwise the same.

Readers accept bags written by other tools (no metadata, any integer coordinate type, float16/32/64
features, or a plain `list<float>` feature column whose rows all have the same length).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.storage import filesystem, full_uri, is_local, write_bytes_atomic
from slidestream.pipelines.labels import read_labels

log = logging.getLogger(__name__)

FEATURE_FORMAT = "1"
SUFFIX = ".parquet"
META_PREFIX = "slidestream."
KEY_ENCODER = b"slidestream.encoder"
KEY_DIM = b"slidestream.dim"
KEY_MPP = b"slidestream.mpp"
KEY_TILE_PX = b"slidestream.tile_px"
KEY_CODE_VERSION = b"slidestream.code_version"
KEY_FORMAT = b"slidestream.format"
_DTYPES = {"float16": (np.float16, pa.float16()), "float32": (np.float32, pa.float32())}
_FOOTER_THREADS = 16
_LIST_MAX = 10


class FeatureBagError(SlidestreamError, ValueError):
    """A feature bag (or a directory of them) that cannot be used; the message names slide, file, column."""


class UnknownSlideError(FeatureBagError, KeyError):
    """A slide id with no bag in the directory (also a KeyError)."""

    __str__ = ValueError.__str__


@dataclass(frozen=True)
class BagMeta:
    """What produced a bag: encoder key, feature dimension, tile geometry and code version."""

    encoder: str
    dim: int
    mpp: float | None
    tile_px: int | None
    code_version: str

    def to_metadata(self) -> dict[bytes, bytes]:
        """Parquet key-value metadata; `mpp` / `tile_px` are left out when unknown."""
        meta = {
            KEY_ENCODER: self.encoder.encode(),
            KEY_DIM: str(int(self.dim)).encode(),
            KEY_CODE_VERSION: self.code_version.encode(),
            KEY_FORMAT: FEATURE_FORMAT.encode(),
        }
        if self.mpp is not None:
            meta[KEY_MPP] = repr(float(self.mpp)).encode()
        if self.tile_px is not None:
            meta[KEY_TILE_PX] = str(int(self.tile_px)).encode()
        return meta

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None) -> BagMeta | None:
        """The BagMeta stored in a schema's metadata, or None when the file has none (another tool's)."""
        if not metadata or KEY_DIM not in metadata:
            return None
        mpp = metadata.get(KEY_MPP)
        tile_px = metadata.get(KEY_TILE_PX)
        return cls(
            encoder=metadata.get(KEY_ENCODER, b"").decode(),
            dim=int(metadata[KEY_DIM]),
            mpp=float(mpp) if mpp else None,
            tile_px=int(tile_px) if tile_px else None,
            code_version=metadata.get(KEY_CODE_VERSION, b"").decode(),
        )


def bag_schema(meta: BagMeta, dtype: str = "float16", aug: bool = False) -> pa.Schema:
    """The Arrow schema (with metadata) of a bag written with `meta`; `aug=True` for Giga-SSL views."""
    if dtype not in _DTYPES:
        raise FeatureBagError(f"feature dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    fields = [pa.field("x", pa.int32()), pa.field("y", pa.int32())]
    fields.append(pa.field("feature", pa.list_(_DTYPES[dtype][1], int(meta.dim))))
    if aug:
        fields.insert(0, pa.field("aug", pa.int16()))
    return pa.schema(fields, metadata=meta.to_metadata())


def _int_column(values: Any, name: str, n: int, dtype: Any) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or len(array) != n:
        raise FeatureBagError(f"column {name!r} has shape {array.shape}, expected ({n},)")
    if array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            array = array.astype(np.int64)
        else:
            raise FeatureBagError(f"column {name!r} must hold integers (got dtype {array.dtype})")
    info = np.iinfo(dtype)
    if n and (array.min() < info.min or array.max() > info.max):
        raise FeatureBagError(f"column {name!r} has values outside the {np.dtype(dtype).name} range")
    return array.astype(dtype)


def bag_table(
    x: Sequence[int] | np.ndarray,
    y: Sequence[int] | np.ndarray,
    features: np.ndarray,
    meta: BagMeta,
    aug: Sequence[int] | np.ndarray | None = None,
    dtype: str = "float16",
) -> pa.Table:
    """A bag table (with metadata) from coordinates and an (N, D) feature array, validated.

    Refuses N == 0, unequal lengths, D != meta.dim and non-finite values (also values that overflow
    float16 when `dtype="float16"`).
    """
    if dtype not in _DTYPES:
        raise FeatureBagError(f"feature dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    np_dtype, _ = _DTYPES[dtype]
    features = np.asarray(features)
    if features.ndim != 2:
        raise FeatureBagError(f"features must be a 2-D (N, D) array, got shape {features.shape}")
    n, dim = features.shape
    if n == 0:
        raise FeatureBagError("features has no rows (a bag needs at least one tile)")
    if dim != meta.dim:
        raise FeatureBagError(f"features have D={dim} but the metadata says dim={meta.dim}")
    if features.dtype.kind not in "fiu":
        raise FeatureBagError(f"features must be numeric, got dtype {features.dtype}")
    if not np.all(np.isfinite(features)):
        bad = int(np.count_nonzero(~np.isfinite(features).all(axis=1)))
        raise FeatureBagError(f"features have NaN/inf values in {bad} of {n} rows")
    with np.errstate(over="ignore"):
        values = features.astype(np_dtype)
    if not np.all(np.isfinite(values)):
        raise FeatureBagError(f"features overflow {dtype} (values up to {np.abs(features).max():.3g})")
    columns = {
        "x": pa.array(_int_column(x, "x", n, np.int32)),
        "y": pa.array(_int_column(y, "y", n, np.int32)),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim),
    }
    if aug is not None:
        columns = {"aug": pa.array(_int_column(aug, "aug", n, np.int16)), **columns}
    schema = bag_schema(meta, dtype, aug=aug is not None)
    return pa.Table.from_pydict(columns, schema=schema)


def _require_columns(table: pa.Table, where: str) -> None:
    missing = [c for c in ("x", "y", "feature") if c not in table.column_names]
    if missing:
        raise FeatureBagError(f"{where}: missing column(s) {missing} (has {table.column_names})")


def write_bag(uri: str, table: pa.Table) -> None:
    """Write one whole bag to `uri` atomically (readers see the complete file or none)."""
    _require_columns(table, uri)
    if table.num_rows == 0:
        raise FeatureBagError(f"{uri}: refusing to write a bag with no tiles")
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(uri, buffer.getvalue())


class ParquetBagWriter:
    """Streams parts of one bag (e.g. chunks from several workers) into one Parquet file, bounded memory.

    Rows go to a temporary local file; `close()` publishes it (local: `os.replace` next to the target;
    S3: one upload), so the target only ever appears complete. A bag with no rows is not published
    (`close()` raises). Used as a context manager, an exception discards the partial file.
    """

    def __init__(self, uri: str, schema: pa.Schema) -> None:
        if "feature" not in schema.names or "x" not in schema.names or "y" not in schema.names:
            raise FeatureBagError(f"{uri}: a bag schema needs x, y and feature (has {schema.names})")
        self.uri = uri
        self.schema = schema
        self.rows = 0
        self._fs, self._path = filesystem(uri)
        if is_local(uri):
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            self._tmp = f"{self._path}.tmp-{uuid.uuid4().hex}"
        else:
            handle, self._tmp = tempfile.mkstemp(prefix="slidestream-bag-", suffix=SUFFIX)
            os.close(handle)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self._tmp, schema)
        self._closed = False

    def write(self, table: pa.Table) -> None:
        """Append one part (same columns as the schema; castable types are cast)."""
        if self._closed or self._writer is None:
            raise FeatureBagError(f"{self.uri}: writer is closed")
        if not table.schema.equals(self.schema, check_metadata=False):
            try:
                table = table.select(self.schema.names).cast(self.schema)
            except (KeyError, ValueError, pa.ArrowException) as exc:
                raise FeatureBagError(
                    f"{self.uri}: part schema {table.schema.to_string(show_schema_metadata=False)} "
                    f"does not match the bag schema: {exc}"
                ) from None
        bad = _non_finite_rows(table.column("feature"))
        if bad:
            raise FeatureBagError(f"{self.uri}: part has NaN/inf features in {bad} rows")
        if table.num_rows:
            self._writer.write_table(table)
            self.rows += table.num_rows

    def close(self) -> None:
        """Finish the file and publish it at the target URI."""
        if self._closed:
            return
        self._closed = True
        try:
            assert self._writer is not None
            self._writer.close()
            self._writer = None
            if self.rows == 0:
                raise FeatureBagError(f"{self.uri}: no rows were written; a bag needs at least one tile")
            if is_local(self.uri):
                with open(self._tmp, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(self._tmp, self._path)
            else:
                self._fs.put_file(self._tmp, self._path)
        finally:
            self._remove_tmp()

    def abort(self) -> None:
        """Discard everything written; nothing appears at the target."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        finally:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._tmp)

    def __enter__(self) -> ParquetBagWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):  # best effort at garbage collection / exit
                self.abort()


def _non_finite_rows(column: pa.ChunkedArray | pa.Array) -> int:
    """How many rows of a (fixed-size) list feature column hold NaN/inf."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return 0
    values = array.flatten()
    finite = pc.is_finite(values)
    if pc.all(finite).as_py() is not False:
        return 0
    flags = np.asarray(finite.to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_fixed_size_list(array.type):
        return int(np.count_nonzero(~flags.reshape(len(array), array.type.list_size).all(axis=1)))
    lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(array)), lengths)
    return len(np.unique(rows[~flags]))


@dataclass
class Bag:
    """One slide's bag as tensors: features (N, D) float32, coords (N, 2) int32 (x, y level-0 px)."""

    slide_id: str
    features: torch.Tensor
    coords: torch.Tensor
    label: object | None
    aug: torch.Tensor | None = None  # (N,) int16 view index, only for Giga-SSL views files


@dataclass(frozen=True)
class _Footer:
    slide_id: str
    uri: str
    path: str  # inside the directory's filesystem
    num_rows: int
    dim: int | None  # None: a variable-length list column without our metadata (known on load)
    fixed: bool
    has_aug: bool
    meta: BagMeta | None


class FeatureBags:
    """Any directory (local or s3://) of <slide_id>.parquet feature bags, optionally joined with labels.

    Only the footers are read up front: every bag must have x, y and a float list `feature` column, and all
    bags the same D. With labels, a labelled slide without a bag is an error; a bag without a label is
    logged and, with `require_labels`, left out of `slide_ids`.
    """

    def __init__(self, root: str, labels: str | None = None, *, require_labels: bool = True) -> None:
        self.root = root
        self.labels_uri = labels
        self._fs, self._path = filesystem(root)
        footers = self._read_footers()
        self._footers: dict[str, _Footer] = {f.slide_id: f for f in footers}
        self.dim = self._common_dim(footers)
        encoders = {f.meta.encoder if f.meta else None for f in footers}
        self.encoder: str | None = encoders.pop() if len(encoders) == 1 else None
        self.encoder = self.encoder or None

        self._labels: dict[str, object] = {}
        self._label_table: pa.Table | None = None
        all_ids = sorted(self._footers)
        if labels is None:
            self.slide_ids: list[str] = all_ids
            return
        table = read_labels(labels)
        ids = [str(s) for s in table.column("slide_id").to_pylist()]
        table = table.set_column(table.column_names.index("slide_id"), "slide_id", pa.array(ids, pa.string()))
        values = table.column("label").to_pylist()
        no_bag = sorted(set(ids) - set(self._footers))
        if no_bag:
            raise FeatureBagError(
                f"labels file {labels} names {len(no_bag)} slide(s) with no feature bag in {root}: "
                f"{_some(no_bag)}"
            )
        self._labels = dict(zip(ids, values, strict=True))
        unlabelled = [s for s in all_ids if s not in self._labels]
        if unlabelled:
            action = "left out" if require_labels else "kept without a label"
            log.warning(
                "%d feature bag(s) in %s have no label in %s and are %s: %s",
                len(unlabelled),
                root,
                labels,
                action,
                _some(unlabelled),
            )
        self.slide_ids = [s for s in all_ids if s in self._labels] if require_labels else all_ids
        self._label_table = table

    # -- discovery ----------------------------------------------------------------------------------------

    def _read_footers(self) -> list[_Footer]:
        try:
            entries = self._fs.ls(self._path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            raise FeatureBagError(f"feature bag directory not found: {self.root}") from None
        names = sorted(
            os.path.basename(e["name"].rstrip("/"))
            for e in entries
            if e.get("type") != "directory" and e["name"].lower().endswith(SUFFIX)
        )
        names = [n for n in names if not n.startswith(".") and len(n) > len(SUFFIX)]
        if not names:
            raise FeatureBagError(f"no *{SUFFIX} feature bags in {self.root}")
        workers = max(1, min(_FOOTER_THREADS, len(names)))
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(self._read_footer, names))

    def _read_footer(self, name: str) -> _Footer:
        slide_id = name[: -len(SUFFIX)]
        local = is_local(self.root)
        path = os.path.join(self._path, name) if local else f"{self._path.rstrip('/')}/{name}"
        uri = full_uri(self._fs, path)
        options = {} if local else {"block_size": 1 << 16, "cache_type": "bytes"}
        try:
            with self._fs.open(path, "rb", **options) as handle:
                parquet = pq.ParquetFile(handle)
                schema = parquet.schema_arrow
                num_rows = parquet.metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise FeatureBagError(f"slide {slide_id}: cannot read Parquet footer of {uri}: {exc}") from None
        return _check_schema(slide_id, uri, path, schema, num_rows)

    def _common_dim(self, footers: list[_Footer]) -> int:
        known = [f for f in footers if f.dim is not None]
        for footer in known[1:]:
            if footer.dim != known[0].dim:
                raise FeatureBagError(
                    f"feature dimension differs between bags in {self.root}: slide {known[0].slide_id} has "
                    f"D={known[0].dim}, slide {footer.slide_id} has D={footer.dim}"
                )
        if known:
            return int(known[0].dim)  # type: ignore[arg-type]
        # Only variable-length list columns without metadata: the first non-empty bag decides.
        for footer in footers:
            if footer.num_rows:
                return int(self._read(footer, None)[2].shape[1])
        raise FeatureBagError(f"every feature bag in {self.root} is empty; cannot tell the feature dimension")

    # -- access -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __iter__(self) -> Iterator[Bag]:
        for slide_id in self.slide_ids:
            yield self.load(slide_id)

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self.slide_ids

    def uri(self, slide_id: str) -> str:
        """The URI of a slide's bag file."""
        return self._footer(slide_id).uri

    def num_tiles(self, slide_id: str) -> int:
        """The number of rows of a slide's bag (from the footer, no data read)."""
        return self._footer(slide_id).num_rows

    def meta(self, slide_id: str) -> BagMeta | None:
        """The BagMeta stored in a slide's bag, or None for a bag written by another tool."""
        return self._footer(slide_id).meta

    def labels(self) -> dict[str, object]:
        """slide_id → label for the labelled slides in `slide_ids`."""
        return {s: self._labels[s] for s in self.slide_ids if s in self._labels}

    def label_table(self) -> pa.Table:
        """The labels table restricted to `slide_ids`, in that order (keeps patient_id/split/fold)."""
        if self._label_table is None:
            raise FeatureBagError(f"feature bags in {self.root} were opened without a labels file")
        keep = pc.is_in(self._label_table.column("slide_id"), pa.array(self.slide_ids, pa.string()))
        table = self._label_table.filter(keep)
        return table.sort_by("slide_id")

    def load(self, slide_id: str) -> Bag:
        """Read one bag as float32 features and int32 coordinates; refuses empty or non-finite bags."""
        footer = self._footer(slide_id)
        coords, aug, features = self._read(footer, self.dim)
        return Bag(
            slide_id=slide_id,
            features=torch.from_numpy(features),
            coords=torch.from_numpy(coords),
            label=self._labels.get(slide_id),
            aug=torch.from_numpy(aug) if aug is not None else None,
        )

    def _footer(self, slide_id: str) -> _Footer:
        try:
            return self._footers[slide_id]
        except KeyError:
            raise UnknownSlideError(f"slide {slide_id!r} has no feature bag in {self.root}") from None

    def _read(self, footer: _Footer, dim: int | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        where = f"slide {footer.slide_id} ({footer.uri})"
        columns = ["aug", "x", "y", "feature"] if footer.has_aug else ["x", "y", "feature"]
        try:
            if is_local(self.root):
                table = pq.read_table(footer.path, columns=columns)
            else:  # one GET for the whole (small) object
                table = pq.read_table(io.BytesIO(self._fs.cat_file(footer.path)), columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise FeatureBagError(f"{where}: cannot read the bag: {exc}") from None
        if table.num_rows == 0:
            raise FeatureBagError(f"{where} has no tiles")
        for name in columns:
            if table.column(name).null_count:
                raise FeatureBagError(f"{where}: column {name!r} has null values")
        try:
            x = table.column("x").cast(pa.int32()).to_numpy()
            y = table.column("y").cast(pa.int32()).to_numpy()
            aug = table.column("aug").cast(pa.int16()).to_numpy().copy() if footer.has_aug else None
        except pa.ArrowInvalid as exc:
            raise FeatureBagError(f"{where}: coordinates do not fit int32 without loss: {exc}") from None
        feature = table.column("feature").combine_chunks()
        n = len(feature)
        if footer.fixed:
            width = feature.type.list_size
        else:
            lengths = pc.list_value_length(feature)
            width = pc.min(lengths).as_py()
            if pc.max(lengths).as_py() != width:
                raise FeatureBagError(
                    f"{where}: column 'feature' has rows of different lengths "
                    f"({width}..{pc.max(lengths).as_py()})"
                )
        if dim is not None and width != dim:
            raise FeatureBagError(f"{where}: D={width} but the other bags have D={dim}")
        values = feature.flatten()
        if values.null_count:
            raise FeatureBagError(f"{where}: column 'feature' has null values")
        features = np.array(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, width)
        finite = np.isfinite(features).all(axis=1)
        if not finite.all():
            raise FeatureBagError(
                f"{where}: NaN/inf features in {int(np.count_nonzero(~finite))} of {n} rows"
            )
        coords = np.ascontiguousarray(np.stack([x, y], axis=1), dtype=np.int32)
        return coords, aug, np.ascontiguousarray(features)

    def __repr__(self) -> str:
        return f"FeatureBags({self.root!r}, {len(self)} slides, dim={self.dim}, encoder={self.encoder!r})"


def _check_schema(slide_id: str, uri: str, path: str, schema: pa.Schema, num_rows: int) -> _Footer:
    where = f"slide {slide_id} ({uri})"
    for name in ("x", "y", "feature"):
        if name not in schema.names:
            raise FeatureBagError(f"{where}: missing column {name!r} (has {schema.names})")
    for name in ("x", "y", "aug"):
        if name in schema.names:
            kind = schema.field(name).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise FeatureBagError(f"{where}: column {name!r} must be integer, not {kind}")
    kind = schema.field("feature").type
    fixed = pa.types.is_fixed_size_list(kind)
    if not (fixed or pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise FeatureBagError(f"{where}: column 'feature' must be a list of floats, not {kind}")
    if not pa.types.is_floating(kind.value_type):
        raise FeatureBagError(f"{where}: column 'feature' must hold floats, not {kind.value_type}")
    try:
        meta = BagMeta.from_metadata(schema.metadata)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeatureBagError(f"{where}: unreadable slidestream metadata: {exc}") from None
    dim = kind.list_size if fixed else (meta.dim if meta else None)
    if fixed and meta is not None and meta.dim != dim:
        raise FeatureBagError(f"{where}: metadata says dim={meta.dim} but column 'feature' has D={dim}")
    if dim is not None and dim <= 0:
        raise FeatureBagError(f"{where}: column 'feature' has D={dim}")
    return _Footer(slide_id, uri, path, num_rows, dim, fixed, "aug" in schema.names, meta)


def _some(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_MAX])
    return shown + (f" … and {len(items) - _LIST_MAX} more" if len(items) > _LIST_MAX else "")


__all__ = [
    "FEATURE_FORMAT",
    "Bag",
    "BagMeta",
    "FeatureBagError",
    "FeatureBags",
    "ParquetBagWriter",
    "UnknownSlideError",
    "bag_schema",
    "bag_table",
    "write_bag",
]
