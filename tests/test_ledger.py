"""The ledger's own rules: later entries supersede earlier ones, across snapshots, locally and on S3."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest

from slidestream.pipelines import ledger as ledger_module
from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.pipelines.ledger_format import encode_commit


def _entry(slide_id: str, version: str, status: str = "ok") -> LedgerEntry:
    return LedgerEntry(
        stage="tiles/k",
        slide_id=slide_id,
        uri=f"/x/{slide_id}.svs",
        size=1,
        etag_or_mtime=version,
        status=status,
        shards=[f"shard-{slide_id}-{version}.tar"],
    )


def _exercise(ledger: Ledger) -> None:
    assert ledger.state() == {}
    ledger.commit([_entry("a", "v1"), _entry("b", "v1")])
    ledger.commit([_entry("a", "v2")])
    assert [e.etag_or_mtime for e in ledger.entries("tiles/k")] == ["v2", "v1"]
    ledger.compact()
    ledger.commit([_entry("b", "v3", status="failed")])  # a commit after a snapshot must win over it
    state = {e.slide_id: e for e in ledger.entries("tiles/k")}
    assert (state["a"].etag_or_mtime, state["b"].etag_or_mtime, state["b"].status) == ("v2", "v3", "failed")
    ledger.compact()
    ledger.compact()
    assert {e.slide_id: e.etag_or_mtime for e in ledger.entries("tiles/k")} == {"a": "v2", "b": "v3"}
    assert ledger.entries("tiles/other") == []


def test_ledger_on_local_disk(tmp_path):
    ledger = Ledger(str(tmp_path))
    _exercise(ledger)
    assert len(list((tmp_path / "ledger").iterdir())) == 1  # compaction leaves one snapshot


@pytest.mark.s3
def test_ledger_on_object_storage(s3_server):
    s3_server.make_bucket("ledger-test")
    _exercise(Ledger("s3://ledger-test/run"))


def test_a_new_reader_sees_the_parquet_snapshot_and_the_commits_after_it(tmp_path):
    writer = Ledger(str(tmp_path))
    varied = [_entry(f"s{i}", "v1") for i in range(5)]
    for i, entry in enumerate(varied):  # lists and maps of every length come back to their own entry
        entry.shards = [f"shard-s{i}-v1.tar"] + [f"shard-s{i}-{k}.tar" for k in range(i - 1)]
        entry.versions = {f"part{k}": str(i) for k in range(i % 3)}
        entry.extra = {"width": 100 * i, "nodes": ["n"] * i} if i % 2 else {}
    writer.commit(varied)
    writer.commit([_entry("s0", "v2")])
    writer.compact()
    writer.commit([_entry("s1", "v3", status="failed")])
    names = sorted(p.name for p in (tmp_path / "ledger").iterdir())
    assert [n.rsplit(".", 1)[1] for n in names] == ["parquet", "json"]
    assert Ledger(str(tmp_path)).state() == writer.state()
    table = pq.read_table(tmp_path / "ledger" / names[0])  # a table any Parquet reader can query
    assert sorted(table.column("slide_id").to_pylist()) == [f"s{i}" for i in range(5)]
    shards = dict(zip(table.column("slide_id").to_pylist(), table.column("shards").to_pylist(), strict=True))
    assert shards["s3"] == ["shard-s3-v1.tar", "shard-s3-0.tar", "shard-s3-1.tar"]
    assert shards["s0"] == ["shard-s0-v2.tar"]


def test_a_ledger_with_a_json_snapshot_from_the_previous_format_is_read_and_compacted_to_parquet(tmp_path):
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    old = [asdict(_entry("a", "v1")), asdict(_entry("b", "v1"))]
    (ledger_dir / f"{time.time_ns():020d}-snapshot-0a0a0a0a.json").write_text(
        json.dumps({"format": 1, "entries": old})
    )
    ledger = Ledger(str(tmp_path))
    ledger.commit([_entry("b", "v2")])
    expected = {"a": "v1", "b": "v2"}
    assert {e.slide_id: e.etag_or_mtime for e in Ledger(str(tmp_path)).entries("tiles/k")} == expected
    ledger.compact()
    assert [p.suffix for p in ledger_dir.iterdir()] == [".parquet"]
    assert {e.slide_id: e.etag_or_mtime for e in Ledger(str(tmp_path)).entries("tiles/k")} == expected


def test_a_writer_folds_its_commits_into_a_snapshot_as_they_pile_up(tmp_path, monkeypatch):
    """A long run's driver keeps the ledger one snapshot plus a bounded tail of commits (here 4), so a
    reader never lists and reads one object per slide of an archive."""
    monkeypatch.setattr(ledger_module, "_COMPACT_MIN_COMMITS", 4)
    writer = Ledger(str(tmp_path))
    writer.state()  # the run's driver reads the state first
    for i in range(10):
        writer.commit([_entry(f"s{i}", "v1")])
        objects = sorted(p.name for p in (tmp_path / "ledger").iterdir())
        assert sum("-commit-" in n for n in objects) < 4 and sum("-snapshot-" in n for n in objects) <= 1
    assert sorted(Ledger(str(tmp_path)).state()) == [("tiles/k", f"s{i}") for i in range(10)]
    assert sum("-snapshot-" in p.name for p in (tmp_path / "ledger").iterdir()) == 1


def test_a_long_lived_reader_reads_only_new_commits_and_agrees_with_a_fresh_reader(tmp_path, monkeypatch):
    """`watch` keeps one reader between polls: each refresh reads the commits written since, and
    everything again after a new snapshot or a commit that sorts before one already applied."""
    writer, reader = Ledger(str(tmp_path)), Ledger(str(tmp_path))
    writer.commit([_entry(f"s{i}", "v1") for i in range(3)])
    writer.compact()
    writer.commit([_entry("s0", "v2")])
    assert reader.refreshed_state() == Ledger(str(tmp_path)).state()
    read: list[str] = []
    original = reader._read
    monkeypatch.setattr(reader, "_read", lambda name: read.append(name) or original(name))

    writer.commit([_entry("s1", "v2")])
    writer.commit([_entry("s3", "v1", status="failed")])
    assert reader.refreshed_state() == Ledger(str(tmp_path)).state()
    assert len(read) == 2 and all("-commit-" in n for n in read)

    read.clear()
    assert reader.refreshed_state() == Ledger(str(tmp_path)).state() and read == []

    writer.compact()  # a new snapshot: read from scratch
    writer.commit([_entry("s2", "v3")])
    assert reader.refreshed_state() == Ledger(str(tmp_path)).state()
    assert sum("-snapshot-" in n for n in read) == 1

    read.clear()  # a late commit that sorts before the last one applied: read from scratch
    late = tmp_path / "ledger" / f"{int(sorted(reader._applied)[-1][:20]) - 1:020d}-commit-late0000.json"
    late.write_bytes(encode_commit([_entry("s2", "v4")]))
    assert reader.refreshed_state() == Ledger(str(tmp_path)).state()
    assert reader.state()[("tiles/k", "s2")].etag_or_mtime == "v3"  # the later name still wins
    assert any("-snapshot-" in n for n in read)
