"""The ledger: the only way outputs become visible.

`OUT/ledger/` holds immutable objects named `<ns>-commit-<id>.json` (entries of finished slides) and
`<ns>-snapshot-<id>.parquet` (everything up to it folded into one table, written at the end of a run and
whenever the commits since the last snapshot grow past a tenth of it, so readers never list and read
thousands of commits). Names sort by their nanosecond timestamp. An entry is keyed by (stage, slide_id);
a later entry supersedes an earlier one. A crash can leave files that no entry references (shards of an
unfinished slide): they are invisible to readers and collected by the next run.
"""

from __future__ import annotations

import time
import uuid

from slidestream.cluster.gc_pause import gc_paused
from slidestream.cluster.storage import filesystem, join, write_bytes_atomic
from slidestream.pipelines.ledger_format import (
    COMMIT_SUFFIX,
    LEDGER_SUFFIXES,
    SNAPSHOT_SUFFIX,
    LedgerEntry,
    Status,
    decode,
    encode_commit,
    encode_snapshot,
)

_READ_ATTEMPTS = 5
# A writer folds its commits into a new snapshot once they outnumber this, or a tenth of the snapshot:
# reading stays one snapshot plus a bounded tail, and rewriting the snapshot costs O(1) per commit.
_COMPACT_MIN_COMMITS = 1000
__all__ = ["Ledger", "LedgerEntry", "Status"]


def _is_snapshot(name: str) -> bool:
    return "-snapshot-" in name


class Ledger:
    """Reads and appends the committed manifests under `OUT/ledger/`.

    The state is read from storage once per instance and then kept up to date by this instance's own
    commits: one driver writes a run's ledger, and re-reading every manifest after each step costs a
    listing and a GET per object on S3.
    """

    def __init__(self, out_uri: str) -> None:
        self.uri = join(out_uri, "ledger")
        self._state: dict[tuple[str, str], LedgerEntry] | None = None
        self._commits_since_snapshot = 0
        self._snapshot: str | None = None  # the snapshot the state was read from
        self._applied: set[str] = set()  # the commits folded into the state since that snapshot

    def _names(self) -> list[str]:
        fs, path = filesystem(self.uri)
        if not fs.exists(path):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(LEDGER_SUFFIXES))

    def _read(self, name: str) -> list[LedgerEntry]:
        fs, path = filesystem(join(self.uri, name))
        return decode(name, fs.cat_file(path), LedgerEntry)

    def state(self) -> dict[tuple[str, str], LedgerEntry]:
        """The current entry per (stage, slide_id): the latest snapshot plus every later commit."""
        if self._state is None:
            self._state = self._read_state()
        return dict(self._state)

    def refreshed_state(self) -> dict[tuple[str, str], LedgerEntry]:
        """The state as storage holds it now, for a long-lived reader (`watch` polls): a listing, then only
        the commits written since this instance last read. It reads everything again when a new snapshot
        was written, or when a new commit sorts before one already applied (entries apply in name order)."""
        if self._state is None:
            return self.state()
        names = self._names()
        snapshots = [n for n in names if _is_snapshot(n)]
        latest = snapshots[-1] if snapshots else None
        new = [n for n in names if not _is_snapshot(n) and n not in self._applied and n > (latest or "")]
        if latest != self._snapshot or (new and self._applied and new[0] < max(self._applied)):
            self._state = self._read_state()
            return dict(self._state)
        try:
            for name in new:
                self._apply(name, self._read(name))
        except FileNotFoundError:  # compacted away between the listing and the read
            self._state = self._read_state()
        return dict(self._state)

    def _apply(self, name: str, entries: list[LedgerEntry]) -> None:
        assert self._state is not None
        self._state.update((entry.key, entry) for entry in entries)
        self._applied.add(name)
        self._commits_since_snapshot += 1

    def _read_state(self) -> dict[tuple[str, str], LedgerEntry]:
        """A reader racing a writer's `compact` may list a commit that is deleted before it is read: the
        snapshot that replaced it was written first, so listing again finds it."""
        for _ in range(_READ_ATTEMPTS - 1):
            try:
                return self._read_listed()
            except FileNotFoundError:
                continue
        return self._read_listed()

    def _read_listed(self) -> dict[tuple[str, str], LedgerEntry]:
        names = self._names()
        snapshots = [n for n in names if _is_snapshot(n)]
        start = snapshots[-1] if snapshots else None
        current: dict[tuple[str, str], LedgerEntry] = {}
        self._commits_since_snapshot, self._snapshot, self._applied = 0, start, set()
        for name in names:
            if (start and name < start) or (_is_snapshot(name) and name != start):
                continue
            entries = self._read(name)
            with gc_paused():
                current.update((entry.key, entry) for entry in entries)
            if name != start:
                self._applied.add(name)
                self._commits_since_snapshot += 1
        return current

    def entries(self, stage: str) -> list[LedgerEntry]:
        return sorted((e for (s, _), e in self.state().items() if s == stage), key=lambda e: e.slide_id)

    def _write(self, prefix: str, suffix: str, data: bytes) -> str:
        name = f"{time.time_ns():020d}-{prefix}-{uuid.uuid4().hex[:8]}{suffix}"
        write_bytes_atomic(join(self.uri, name), data)
        return name

    def commit(self, entries: list[LedgerEntry]) -> None:
        """Make `entries` visible, atomically (one object). A writer that has read the state folds the
        commits into a new snapshot once they pass `_COMPACT_MIN_COMMITS` or a tenth of the snapshot."""
        if not entries:
            return
        now = time.time()
        for entry in entries:
            entry.committed_at = now
        name = self._write("commit", COMMIT_SUFFIX, encode_commit(entries))
        if self._state is None:
            return
        self._apply(name, entries)
        if self._commits_since_snapshot >= max(_COMPACT_MIN_COMMITS, len(self._state) // 10):
            self.compact()

    def compact(self) -> None:
        """Fold the current state into one snapshot and delete the objects it covers."""
        names = self._names()
        if len(names) <= 1:
            return
        state = self.state()
        if not state:
            return
        snapshot = self._write("snapshot", SNAPSHOT_SUFFIX, encode_snapshot(list(state.values())))
        self._commits_since_snapshot, self._snapshot, self._applied = 0, snapshot, set()
        fs, root = filesystem(self.uri)
        stale = [f"{root}/{n}" for n in names if n < snapshot]
        if stale:
            fs.rm(stale)  # one bulk request on S3
