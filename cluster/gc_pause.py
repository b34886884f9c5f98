"""Pausing Python's cycle collector while a large, acyclic result is built.

The collector runs every few hundred allocations and walks every object not yet promoted to its oldest
generation. Building 10^5 ledger entries or listing 10^5 objects (each a few dicts, lists and strings, none
in a cycle) then spends seconds in collections that find no garbage: pausing it made a ledger read of
100,000 slides 2.5× faster and took seconds off a `watch` poll (bench/RESULTS.md, "Archive scale").
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """The collector off inside the block (for every thread: it is per process), as it was after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
