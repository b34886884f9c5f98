"""The slide-stream driver that ingest and embed share: a Ray Data stream of per-chunk results is
consumed on the driver, and each slide is committed to the ledger as soon as all its chunks are in.

    plan → read → consume (encoder actors) → commit_slides: one ledger commit per slide

A slide's outputs become visible only through that commit (exactly-once at slide granularity); the
report and the caller's callback learn about each slide right after its commit. The slides of a run go
through in windows (`ingest.window_slides`), one dataset each, built when the one before is drained: the
driver holds one window's blocks at a time, so a run over 10^5 slides needs no more memory than one
over a window's worth.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray

from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.pipelines.slides import SlideRef

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class SlideProgress:
    slide: SlideRef
    n_chunks: int = -1
    results: list[dict] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.n_chunks >= 0 and len({r["chunk"] for r in self.results}) >= max(self.n_chunks, 1)


@dataclass
class IngestReport:
    stage: str
    out: str
    discovered: int = 0
    skipped_unchanged: int = 0
    ok: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    ignored_files: int = 0
    tiles: int = 0
    shard_bytes: int = 0
    nodes: set[str] = field(default_factory=set)
    seconds: float = 0.0

    def record(self, entry: LedgerEntry, results: list[dict]) -> None:
        """Count one committed slide."""
        if entry.status == "ok":
            self.ok.append(entry.slide_id)
            self.tiles += entry.n_tiles
            self.shard_bytes += sum(r.get("shard_bytes", 0) for r in results)
        else:
            self.failed[entry.slide_id] = entry.error or ""

    def summary(self) -> str:
        lines = [
            f"ingest → {self.out} [{self.stage}]",
            f"  slides: {self.discovered} found, {self.skipped_unchanged} unchanged (skipped), "
            f"{len(self.ok)} ingested, {len(self.failed)} failed; "
            f"{self.ignored_files} non-slide files ignored",
            f"  tiles: {self.tiles} ({self.shard_bytes / 1e6:.1f} MB of shards) in {self.seconds:.1f} s "
            f"on {len(self.nodes)} node(s)",
        ]
        lines += [f"  FAILED {slide_id}: {reason}" for slide_id, reason in sorted(self.failed.items())]
        return "\n".join(lines)


def windows(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """`items` in consecutive runs of at most `size`."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def completed_slides(
    datasets: Iterable[ray.data.Dataset], pending: dict[str, SlideProgress]
) -> Iterator[SlideProgress]:
    """Consume chunk results; yield each slide as soon as all its chunks are in (and forget it)."""
    for dataset in datasets:
        for row in dataset.iter_rows():
            progress = pending[row["slide_id"]]
            progress.n_chunks = row["n_chunks"]
            progress.results.append(row)
            if progress.complete:
                del pending[row["slide_id"]]
                yield progress


def commit_slides(
    datasets: Iterable[ray.data.Dataset],
    pending: dict[str, SlideProgress],
    ledger: Ledger,
    report: IngestReport,
    entries_of: Callable[[SlideProgress], list[LedgerEntry]],
    progress_callback: Callable[[LedgerEntry], Any] | None = None,
) -> None:
    """Commit each completed slide: `entries_of` gives its ledger entries (the first is the one
    reported), committed together in one ledger commit so that they become visible together.
    `datasets` (lazily built, one per window of slides) together cover every slide of `pending`."""
    total, started = len(pending), time.monotonic()
    for done, progress in enumerate(completed_slides(datasets, pending), start=1):
        entries = entries_of(progress)
        ledger.commit(entries)
        report.record(entries[0], progress.results)
        log.info(progress_line(report, done, total, time.monotonic() - started), extra={"progress": True})
        if progress_callback is not None:
            progress_callback(entries[0])


def progress_line(report: IngestReport, done: int, total: int, seconds: float) -> str:
    """The console's live line for a slide stream: slides done of total, tiles/s and the time left."""
    failed = f" ({len(report.failed)} failed)" if report.failed else ""
    left = seconds / done * (total - done)
    return (
        f"[{report.stage}] {done}/{total} slides{failed}, {report.tiles} tiles, "
        f"{report.tiles / max(seconds, 1e-9):.1f} tiles/s, ETA {int(left) // 60}:{int(left) % 60:02d}"
    )


def no_fusion() -> dict[str, Any]:
    """As a `ray_remote_args_fn`, keeps Ray Data from fusing a task stage into the encoder actors, so
    decoding runs in parallel tasks rather than serialised inside the actor pool. (Ray 2.60; the
    argument is deprecated for 2.64, where an explicit TaskPoolStrategy size can do the same.)"""
    return {}
