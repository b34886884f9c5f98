"""Counting what a process fetches from S3: the bytes of every ranged GET s3fs makes (file reads and
`cat_ranges`), to check that a reader fetches ranges rather than whole slides."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import s3fs.core


@dataclass
class Fetched:
    requests: int = 0
    bytes: int = 0
    largest: int = 0  # bytes of the largest single GET

    def add(self, data: Any) -> None:
        self.requests += 1
        self.bytes += len(data)
        self.largest = max(self.largest, len(data))


@contextmanager
def s3_fetches() -> Iterator[Fetched]:
    """Within the block, every GET s3fs makes in this process is counted (it still happens as usual)."""
    fetched = Fetched()
    inner_fetch, cat_file = s3fs.core._inner_fetch, s3fs.core.S3FileSystem._cat_file

    async def counted_fetch(*args: Any, **kwargs: Any) -> Any:
        data = await inner_fetch(*args, **kwargs)
        fetched.add(data)
        return data

    async def counted_cat(self: s3fs.core.S3FileSystem, *args: Any, **kwargs: Any) -> Any:
        data = await cat_file(self, *args, **kwargs)
        fetched.add(data)
        return data

    s3fs.core._inner_fetch = counted_fetch
    s3fs.core.S3FileSystem._cat_file = counted_cat  # type: ignore[method-assign]
    try:
        yield fetched
    finally:
        s3fs.core._inner_fetch = inner_fetch
        s3fs.core.S3FileSystem._cat_file = cat_file  # type: ignore[method-assign]
