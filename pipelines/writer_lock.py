"""One writer per output root: a lease object `OUT/writer.lock`.

The ledger assumes a single writer (each writer keeps its own view of the committed state), so a second
`watch` on the same OUT must be refused rather than interleave commits. The lock is a small JSON object
{owner, command, host, pid, heartbeat} refreshed by a background thread; a lock whose heartbeat is older
than the TTL, or whose process is gone from this host, is stale and may be taken over (a writer killed
with SIGKILL never releases it). Works on local disk and object storage alike; on object storage two
writers starting in the same instant are separated by writing, waiting and reading the lock back.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.storage import filesystem, join, write_bytes_atomic

log = logging.getLogger(__name__)

LOCK_NAME = "writer.lock"
_SETTLE_S = 0.3  # wait between writing the lock and reading it back (a concurrent writer shows up)


class WriterLockError(SlidestreamError, ValueError):
    """The output root is held by another live writer (the message says which); a ValueError, like other
    unusable command-line arguments."""


def _alive_here(host: str, pid: int) -> bool:
    """False only when the lock's process is known to be gone (same host, no such pid)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """`with WriterLock(out, "watch", ttl_s=120):` — held, and kept fresh, for the block's duration."""

    def __init__(self, out: str, command: str, ttl_s: float = 120.0) -> None:
        self.uri = join(out, LOCK_NAME)
        self.command, self.ttl_s = command, ttl_s
        self.owner = uuid.uuid4().hex
        self.lost = threading.Event()  # set when another writer took the lock over (we were presumed dead)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        fs, path = filesystem(self.uri)
        try:
            return json.loads(fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError:
            return None  # a torn or foreign file is no lock anyone holds

    def _write(self) -> None:
        body = {
            "owner": self.owner,
            "command": self.command,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "heartbeat": time.time(),
        }
        write_bytes_atomic(self.uri, json.dumps(body).encode())

    def _stale(self, holder: dict) -> bool:
        age = time.time() - float(holder.get("heartbeat", 0))
        return age > self.ttl_s or not _alive_here(str(holder.get("host")), int(holder.get("pid", -1)))

    def acquire(self) -> None:
        holder = self._read()
        if holder is not None and holder.get("owner") != self.owner and not self._stale(holder):
            age = time.time() - float(holder.get("heartbeat", 0))
            raise WriterLockError(
                f"{self.uri} is held by a running `slidestream {holder.get('command')}` "
                f"(pid {holder.get('pid')} on {holder.get('host')}, refreshed {age:.0f} s ago): one writer "
                f"per output root; stop it, or wait {self.ttl_s:.0f} s if it died"
            )
        self._write()
        time.sleep(_SETTLE_S)
        holder = self._read()
        if holder is None or holder.get("owner") != self.owner:
            raise WriterLockError(f"{self.uri}: another writer took the lock at the same moment")
        self._thread = threading.Thread(target=self._beat, name="writer-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                holder = self._read()
                if holder is not None and holder.get("owner") != self.owner:
                    self.lost.set()
                    return
                self._write()
            except Exception:  # storage unreachable for a moment (any client error): the next beat retries
                continue

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self._read()
            if holder is not None and holder.get("owner") == self.owner:
                fs, path = filesystem(self.uri)
                fs.rm_file(path)
        except Exception:  # unreachable storage: the lock goes stale after its TTL
            log.warning("could not remove %s; it goes stale after %.0f s", self.uri, self.ttl_s)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
