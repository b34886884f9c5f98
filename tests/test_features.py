"""Feature bags: the Parquet contract the trainers read, written by us or another tool, locally and on S3."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from slidestream.pipelines.features import (
    FEATURE_FORMAT,
    BagMeta,
    FeatureBagError,
    FeatureBags,
    ParquetBagWriter,
    bag_table,
    write_bag,
)

D = 8
META = BagMeta(encoder="toy-abc123", dim=D, mpp=0.5, tile_px=224, code_version="test-1")


def _features(n: int, dim: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def _write(
    root, slide_id: str, n: int = 5, dim: int = D, seed: int = 0, dtype: str = "float16"
) -> np.ndarray:
    feats = _features(n, dim, seed)
    meta = BagMeta(META.encoder, dim, META.mpp, META.tile_px, META.code_version)
    write_bag(
        f"{root}/{slide_id}.parquet",
        bag_table(np.arange(n) * 224, np.arange(n) * 448, feats, meta, dtype=dtype),
    )
    return feats


def _labels(path, rows: list[tuple[str, str]]) -> str:
    path.write_text("slide_id,label\n" + "".join(f"{s},{label}\n" for s, label in rows))
    return str(path)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, dtype):
    root = tmp_path / "bags"
    feats = _write(root, "slide-A", n=7, dtype=dtype)
    _write(root, "slide-B", n=3, seed=1, dtype=dtype)
    (root / "notes.txt").write_text("ignored")

    schema = pq.read_schema(root / "slide-A.parquet")
    assert schema.field("x").type == pa.int32() and schema.field("y").type == pa.int32()
    assert schema.field("feature").type == pa.list_(getattr(pa, dtype)(), D)
    assert schema.metadata[b"slidestream.format"] == FEATURE_FORMAT.encode()
    assert schema.metadata[b"slidestream.dim"] == b"8"
    assert float(schema.metadata[b"slidestream.mpp"]) == 0.5
    assert schema.metadata[b"slidestream.tile_px"] == b"224"
    assert schema.metadata[b"slidestream.code_version"] == b"test-1"

    bags = FeatureBags(str(root))
    assert bags.slide_ids == ["slide-A", "slide-B"] and len(bags) == 2
    assert (bags.dim, bags.encoder) == (D, "toy-abc123")
    assert bags.meta("slide-A") == META
    bag = bags.load("slide-A")
    assert bag.features.dtype == torch.float32 and bag.features.shape == (7, D)
    tol = 1e-2 if dtype == "float16" else 0
    np.testing.assert_allclose(bag.features.numpy(), feats, atol=tol, rtol=tol)
    assert bag.coords.dtype == torch.int32
    assert bag.coords.tolist() == [[224 * i, 448 * i] for i in range(7)]
    assert bag.label is None and bag.aug is None
    assert [b.slide_id for b in bags] == ["slide-A", "slide-B"]


def test_gigassl_views_have_aug(tmp_path):
    table = bag_table([0, 1, 0, 1], [0, 0, 1, 1], _features(4), META, aug=[0, 0, 1, 1])
    assert table.column_names == ["aug", "x", "y", "feature"] and table.schema.field("aug").type == pa.int16()
    write_bag(str(tmp_path / "s.parquet"), table)
    assert FeatureBags(str(tmp_path)).load("s").aug.tolist() == [0, 0, 1, 1]


def test_streaming_writer_publishes_one_file_on_close(tmp_path):
    target = tmp_path / "bags" / "big.parquet"
    parts = [
        bag_table(np.arange(i * 4, i * 4 + 4), np.zeros(4), _features(4, seed=i), META) for i in range(3)
    ]
    with ParquetBagWriter(str(target), parts[0].schema) as writer:
        for part in parts:
            writer.write(part)
            assert not target.exists()
    assert target.exists() and [p.name for p in target.parent.iterdir()] == ["big.parquet"]
    bag = FeatureBags(str(target.parent)).load("big")
    assert bag.coords[:, 0].tolist() == list(range(12))
    expected = np.concatenate([_features(4, seed=i) for i in range(3)])
    np.testing.assert_allclose(bag.features.numpy(), expected, atol=1e-2, rtol=1e-2)
    assert pq.read_schema(target).metadata[b"slidestream.encoder"] == b"toy-abc123"


def test_streaming_writer_discards_on_error(tmp_path):
    target = tmp_path / "bad.parquet"
    part = bag_table([0], [0], _features(1), META)
    with pytest.raises(RuntimeError), ParquetBagWriter(str(target), part.schema) as writer:
        writer.write(part)
        raise RuntimeError("worker died")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FeatureBagError, match="no rows"), ParquetBagWriter(str(target), part.schema):
        pass
    assert list(tmp_path.iterdir()) == []


def test_bag_from_another_tool(tmp_path):
    feats = _features(4, dim=6)
    flat = pa.array(feats.reshape(-1))
    pq.write_table(
        pa.table(
            {
                "x": pa.array([1, 2, 3, 4], pa.int64()),
                "y": [5, 6, 7, 8],
                "feature": pa.FixedSizeListArray.from_arrays(flat, 6),
                "extra": ["a"] * 4,
            }
        ),
        tmp_path / "foreign.parquet",
    )
    pq.write_table(
        pa.table({"x": [0, 1], "y": [0, 1], "feature": pa.array(feats[:2].tolist(), pa.list_(pa.float64()))}),
        tmp_path / "listy.parquet",
    )
    bags = FeatureBags(str(tmp_path))
    assert (bags.dim, bags.encoder, bags.slide_ids) == (6, None, ["foreign", "listy"])
    np.testing.assert_array_equal(bags.load("foreign").features.numpy(), feats)
    assert bags.load("foreign").coords.tolist() == [[1, 5], [2, 6], [3, 7], [4, 8]]
    np.testing.assert_allclose(bags.load("listy").features.numpy(), feats[:2])


def test_dim_mismatch_names_both_slides(tmp_path):
    _write(tmp_path, "small", dim=4)
    _write(tmp_path, "wide", dim=16)
    with pytest.raises(FeatureBagError, match=r"small has D=4.*wide has D=16"):
        FeatureBags(str(tmp_path))


def test_missing_feature_column(tmp_path):
    pq.write_table(pa.table({"x": [0], "y": [0], "emb": [[0.1, 0.2]]}), tmp_path / "nofeat.parquet")
    with pytest.raises(FeatureBagError, match=r"nofeat.*'feature'"):
        FeatureBags(str(tmp_path))


def test_empty_bag_is_refused(tmp_path):
    _write(tmp_path, "ok")
    empty = pa.table(
        {
            "x": pa.array([], pa.int32()),
            "y": pa.array([], pa.int32()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array([], pa.float32()), D),
        }
    )
    pq.write_table(empty, tmp_path / "empty.parquet")
    bags = FeatureBags(str(tmp_path))
    assert bags.num_tiles("empty") == 0
    with pytest.raises(FeatureBagError, match=r"empty.*has no tiles"):
        bags.load("empty")
    with pytest.raises(FeatureBagError, match="no rows"):
        bag_table([], [], np.zeros((0, D), np.float32), META)
    with pytest.raises(FeatureBagError) as info:
        bags.load("nope")
    assert isinstance(info.value, KeyError) and "nope" in str(info.value)


def test_nan_features_are_refused(tmp_path):
    feats = _features(3)
    feats[1, 2] = np.nan
    with pytest.raises(FeatureBagError, match="NaN/inf"):
        bag_table([0, 1, 2], [0, 1, 2], feats, META)
    with pytest.raises(FeatureBagError, match="overflow"):
        bag_table([0], [0], np.full((1, D), 1e6, np.float32), META)
    with pytest.raises(FeatureBagError, match="dim=8"):
        bag_table([0], [0], np.zeros((1, 3), np.float32), META)
    raw = pa.table(
        {
            "x": [0, 1, 2],
            "y": [0, 1, 2],
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), D),
        }
    )
    pq.write_table(raw, tmp_path / "nan-slide.parquet")
    with pytest.raises(FeatureBagError, match=r"nan-slide.*NaN/inf features in 1 of 3 rows"):
        FeatureBags(str(tmp_path)).load("nan-slide")


def test_labels_join(tmp_path):
    root = tmp_path / "bags"
    for name in ("a", "b", "c"):
        _write(root, name)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,patient_id,split\nb,1,p1,train\na,0,p2,test\n")
    bags = FeatureBags(str(root), str(labels))
    assert bags.slide_ids == ["a", "b"] and bags.labels() == {"a": "0", "b": "1"}
    assert bags.load("b").label == "1"
    table = bags.label_table()
    assert table.column("slide_id").to_pylist() == ["a", "b"]
    assert table.column_names == ["slide_id", "label", "patient_id", "split"]
    kept = FeatureBags(str(root), str(labels), require_labels=False)
    assert kept.slide_ids == ["a", "b", "c"] and kept.load("c").label is None


def test_unlabelled_bag_is_excluded_with_a_warning(tmp_path, caplog):
    root = tmp_path / "bags"
    _write(root, "labelled")
    _write(root, "orphan")
    with caplog.at_level(logging.WARNING, logger="slidestream.pipelines.features"):
        bags = FeatureBags(str(root), _labels(tmp_path / "l.csv", [("labelled", "1")]))
    assert bags.slide_ids == ["labelled"]
    assert any("orphan" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_label_without_bag_is_an_error(tmp_path):
    root = tmp_path / "bags"
    _write(root, "present")
    labels = _labels(tmp_path / "l.csv", [("present", "0"), ("ghost-1", "1"), ("ghost-2", "0")])
    with pytest.raises(FeatureBagError, match=r"2 slide\(s\).*ghost-1, ghost-2"):
        FeatureBags(str(root), labels)


@pytest.mark.s3
def test_s3_round_trip(s3_server, tmp_path):
    s3_server.make_bucket("feat-test")
    root = "s3://feat-test/features/toy"
    feats = _write(root, "s3-slide", n=6, dtype="float32")
    parts = [bag_table([i], [i], _features(1, seed=i), META) for i in range(3)]
    with ParquetBagWriter(f"{root}/streamed.parquet", parts[0].schema) as writer:
        for part in parts:
            writer.write(part)
    bags = FeatureBags(root, _labels(tmp_path / "l.csv", [("s3-slide", "1"), ("streamed", "0")]))
    assert (bags.slide_ids, bags.dim, bags.encoder) == (["s3-slide", "streamed"], D, "toy-abc123")
    bag = bags.load("s3-slide")
    np.testing.assert_array_equal(bag.features.numpy(), feats)
    assert bag.label == "1" and bag.coords[:, 1].tolist() == [448 * i for i in range(6)]
    assert bags.load("streamed").coords[:, 0].tolist() == [0, 1, 2]
    assert bags.uri("streamed") == f"{root}/streamed.parquet"
