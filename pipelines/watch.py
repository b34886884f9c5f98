"""`slidestream watch`: keep OUT in step with a growing slide prefix.

Each poll lists the prefix, diffs it against the ledger, and sends every new or changed slide whose
fingerprint (size + etag/mtime) has held still since the previous poll through one ingest + embed pass
(`run_ingest` with an embedding stage): a burst of arrivals is one Ray Data stream, not a pipeline per
slide. A slide still being written changes fingerprint between polls and waits; one whose upload stalled
long enough to look still fails as a truncated slide, and is retried once its fingerprint changes again.

Exactly-once comes from the ledger: a slide's outputs are visible only through its commit. SIGTERM or
SIGINT stop the watcher after the slide being committed (a second signal stops at once); the rest of the
burst is left uncommitted and taken by the next start. Storage errors (object store down) back off and
retry. One watcher per OUT, enforced by `slidestream.pipelines.writer_lock`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from slidestream.cluster.config import Config
from slidestream.cluster.gc_pause import gc_paused
from slidestream.cluster.runtime import ensure_ray
from slidestream.cluster.storage import join, scrub_secrets, write_bytes_atomic
from slidestream.pipelines.ingest import run_ingest, slides_to_do
from slidestream.pipelines.ledger import Ledger, LedgerEntry
from slidestream.pipelines.slides import Discovery, DiscoveryError, SlideRef, discover_slides
from slidestream.pipelines.tile_store import tiles_stage
from slidestream.pipelines.writer_lock import WriterLock, WriterLockError

if TYPE_CHECKING:
    from slidestream.pipelines.embed import EmbedStage

log = logging.getLogger(__name__)

# Called after each burst with every committed feature bag, {slide_id: slide fingerprint}; returns how many
# slides have been scored in all. `watch --model` passes a scorer from trainers (pipelines never import them).
CommittedCallback = Callable[[dict[str, str]], int]
_LATENCIES_KEPT = 10_000


class _StopRequested(Exception):
    """Raised between two slide commits to leave the burst once a stop was asked for."""


@dataclass
class WatchStatus:
    """What the status line shows and the JSON status holds (counts are for this watcher's lifetime)."""

    slides: str
    out: str
    state: str = "starting"  # starting, idle, processing, backoff, stopping, stopped
    seen: int = 0  # distinct slides seen under the prefix
    committed: int = 0  # slides committed ok by this watcher
    failed: int = 0  # slides committed as failed by this watcher
    waiting: int = 0  # new or changed slides whose fingerprint has not held still yet
    in_flight: int = 0  # slides of the current burst not yet committed
    polls: int = 0
    bursts: int = 0
    errors: int = 0  # polls or bursts that failed (storage unreachable…) and were retried
    last_error: str | None = None
    scored: int = 0  # slides scored with --model
    started_at: float = field(default_factory=time.time)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=_LATENCIES_KEPT))

    def latency(self) -> dict[str, float | None]:
        if not self.latencies:
            return {"last": None, "p50": None, "p95": None}
        values = np.asarray(self.latencies)
        return {
            "last": round(float(values[-1]), 3),
            "p50": round(float(np.percentile(values, 50)), 3),
            "p95": round(float(np.percentile(values, 95)), 3),
        }

    def payload(self) -> dict[str, Any]:
        return {
            "slides_uri": self.slides,
            "out": self.out,
            "state": self.state,
            "slides": {
                "seen": self.seen,
                "committed": self.committed,
                "failed": self.failed,
                "waiting": self.waiting,
                "in_flight": self.in_flight,
                "scored": self.scored,
            },
            "latency_s": self.latency(),  # first seen by the watcher → committed
            "polls": self.polls,
            "bursts": self.bursts,
            "errors": self.errors,
            "last_error": self.last_error,
            "started_at": self.started_at,
            "updated_at": time.time(),
        }

    def line(self) -> str:
        lat = self.latency()
        timing = "-" if lat["p50"] is None else f"p50 {lat['p50']:.1f} s p95 {lat['p95']:.1f} s"
        return (
            f"watch [{self.state}] seen {self.seen} committed {self.committed} failed {self.failed} "
            f"waiting {self.waiting} in flight {self.in_flight} | latency {timing} | errors {self.errors}"
        )


@contextlib.contextmanager
def _stop_on_signals(request_stop: Callable[[], None]) -> Iterator[None]:
    """First SIGTERM/SIGINT asks for a clean stop; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            raise KeyboardInterrupt
        log.info("watch: %s received, stopping after the slide being committed", signal.Signals(signum).name)
        request_stop()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Watcher:
    """The poll → diff → burst → commit loop (`run`), or one step of it (`step`, for tests)."""

    def __init__(
        self,
        slides: str,
        out: str,
        config: Config,
        embed: EmbedStage,
        *,
        status_uri: str | None = None,
        on_committed: CommittedCallback | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.slides, self.out, self.config, self.embed = slides, out, config, embed
        self.cfg = config.watch
        self.status = WatchStatus(slides=slides, out=out)
        self.status_uri = status_uri or join(out, "watch", "status.json")
        self.on_committed = on_committed
        self.echo = echo or _status_printer()
        self.stages = [tiles_stage(config.tiling), embed.stage]
        self.ledger = Ledger(out)  # kept between polls: each poll reads only what was committed since
        self._stop = threading.Event()
        self._seen: dict[str, tuple[str, float]] = {}  # slide_id → (fingerprint, first seen at)
        self._retry: dict[str, tuple[int, float]] = {}  # transient failures: slide_id → (tries, not before)
        self._lock: WriterLock | None = None
        self._status_written = 0.0

    # ------------------------------------------------------------------------------------------ control

    def request_stop(self) -> None:
        self._stop.set()
        if self.status.state != "stopped":
            self.status.state = "stopping"

    def run(self) -> WatchStatus:
        """Watch until stopped by a signal (or `request_stop`); returns the final status."""
        with WriterLock(self.out, "watch", self.cfg.lock_ttl_s) as lock:
            ensure_ray(self.config.ray)  # before the signal handlers: Ray installs its own on init
            self._lock = lock
            with _stop_on_signals(self.request_stop):
                self._loop()
        return self.status

    def _loop(self) -> None:
        """Poll and process until stopped; storage errors back off (doubling, capped) and retry."""
        self._notify_committed()  # slides committed before a restart but not yet scored
        failures = 0
        while not self._stop.is_set():
            try:
                worked = self.step()
                failures = 0
            except _StopRequested:
                break
            except WriterLockError:
                raise
            except Exception as exc:  # storage or cluster trouble: back off, then retry the poll
                if isinstance(exc, DiscoveryError) and self.status.polls == 0:
                    raise  # a slide source that is wrong from the start is the user's error
                failures += 1
                self._record_error(exc)
                self._stop.wait(min(self.cfg.interval_s * 2**failures, self.cfg.max_backoff_s))
                continue
            if not worked:
                self._stop.wait(self.cfg.interval_s)
        self.status.state, self.status.in_flight = "stopped", 0
        self._publish(force=True)

    def step(self) -> bool:
        """One poll, and one burst over the slides that are ready; True when a burst ran."""
        ready = self.poll()
        if not ready:
            self._set_state("idle")
            return False
        self.burst(ready)
        self._notify_committed()
        return True

    # ---------------------------------------------------------------------------------------------- poll

    def poll(self) -> list[SlideRef]:
        with gc_paused():  # listing, ledger and diff: 10^5-object structures without cycles
            return self._poll()

    def _poll(self) -> list[SlideRef]:
        found = discover_slides(self.slides, self.config.ingest.slide_extensions)
        state = self.ledger.refreshed_state()
        now, ready, waiting = time.time(), [], 0
        todo = {s.slide_id for s in slides_to_do(found.slides, state, self.stages)}
        for slide in found.slides:
            previous = self._seen.get(slide.slide_id)
            if previous is None or previous[0] != slide.fingerprint:
                self._seen[slide.slide_id] = (slide.fingerprint, now)
            if slide.slide_id not in todo:
                continue
            if previous is None or previous[0] != slide.fingerprint:
                waiting += 1  # new or still changing: taken once it holds still for a poll
            elif self._due(slide, state, now):
                ready.append(slide)
        self.status.polls += 1
        self.status.seen, self.status.waiting = len(self._seen), waiting
        return ready

    def _due(self, slide: SlideRef, state: dict[tuple[str, str], LedgerEntry], now: float) -> bool:
        """A version that failed transiently is retried with a doubling delay (not on every poll)."""
        slide_id = slide.slide_id
        entries = [state.get((stage, slide_id)) for stage in self.stages]
        if not any(
            e is not None
            and e.status == "failed"
            and not e.permanent
            and e.etag_or_mtime == slide.fingerprint
            for e in entries
        ):
            self._retry.pop(slide_id, None)
            return True
        tries, not_before = self._retry.get(slide_id, (0, 0.0))
        if now < not_before:
            return False
        delay = min(self.cfg.interval_s * 2 ** (tries + 1), self.cfg.max_backoff_s)
        self._retry[slide_id] = (tries + 1, now + delay)
        return True

    # --------------------------------------------------------------------------------------------- burst

    def burst(self, ready: list[SlideRef]) -> None:
        self.status.bursts += 1
        self.status.in_flight = len(ready)
        self._set_state("processing")
        log.info("watch: burst of %d slide(s)", len(ready))
        run_ingest(
            self.slides,
            self.out,
            self.config,
            embed=self.embed,
            progress_callback=self._slide_committed,
            discovery=Discovery(slides=ready),
        )
        self.status.in_flight = 0
        self._set_state("stopping" if self._stop.is_set() else "idle", force=True)

    def _slide_committed(self, entry: LedgerEntry) -> None:
        self.status.in_flight = max(0, self.status.in_flight - 1)
        if entry.status == "ok":
            self.status.committed += 1
        else:
            self.status.failed += 1
        seen = self._seen.get(entry.slide_id)
        if seen is not None and seen[0] == entry.etag_or_mtime:
            self.status.latencies.append(time.time() - seen[1])
        self._publish()
        if self._lock is not None and self._lock.lost.is_set():
            raise WriterLockError(f"{self._lock.uri} was taken over by another writer; stopping")
        if self._stop.is_set():
            raise _StopRequested

    def _notify_committed(self) -> None:
        if self.on_committed is None:
            return
        entries = Ledger(self.out).entries(self.embed.stage)
        bags = {e.slide_id: e.etag_or_mtime for e in entries if e.status == "ok"}
        self.status.scored = self.on_committed(bags)

    # -------------------------------------------------------------------------------------------- status

    def _record_error(self, exc: Exception) -> None:
        self.status.errors += 1
        self.status.last_error = scrub_secrets(f"{type(exc).__name__}: {exc}")[:500]
        log.warning("watch: %s (retrying with backoff)", self.status.last_error)
        self.status.in_flight = 0
        self._set_state("backoff", force=True)

    def _set_state(self, state: str, force: bool = False) -> None:
        changed = state != self.status.state
        if not (self._stop.is_set() and state in ("idle", "processing")):
            self.status.state = state
        self._publish(force=force or changed)

    def _publish(self, force: bool = False) -> None:
        self.echo(self.status.line())
        now = time.monotonic()
        if not force and now - self._status_written < self.cfg.status_every_s:
            return
        self._status_written = now
        try:
            write_bytes_atomic(self.status_uri, json.dumps(self.status.payload(), indent=1).encode())
        except OSError as exc:  # the status is informative: never let it stop the watcher
            log.debug("watch: status not written: %s", exc)


def _status_printer() -> Callable[[str], None]:
    """A live line on a terminal (rewritten in place); one line per change otherwise (logs)."""
    last: list[str] = [""]
    tty = sys.stderr.isatty()

    def echo(line: str) -> None:
        if line == last[0]:
            return
        last[0] = line
        sys.stderr.write(f"\r\x1b[2K{line}" if tty else f"{line}\n")
        sys.stderr.flush()

    return echo
