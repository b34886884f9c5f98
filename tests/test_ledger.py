"""The ledger's own rules: later entries supersede earlier ones, across snapshots, locally and on S3."""

from __future__ import annotations

import pytest

from slidestream.pipelines.ledger import Ledger, LedgerEntry


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
