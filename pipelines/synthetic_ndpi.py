"""Writing a pyramid as a Hamamatsu NDPI file, laid out as the scanners write it, so the NDPI path of the
TIFF reader is tested on real files.

NDPI is a little-endian classic TIFF with 64-bit extensions: the header's first-IFD offset and each IFD's
next-IFD offset are 8 bytes, and each IFD is followed by the high 32 bits of its 12-byte entries' offsets
(all zero below 4 GB). Every level is one page holding a single JPEG strip of the whole level, encoded with
restart markers; the `McuStarts` tag (65426) lists where each restart interval begins, which is how
readers fetch a region without decoding the level. `FileFormat` (65420), `SourceLens` (65421, the
objective magnification; -1 marks the macro photo) and `Make` = Hamamatsu identify the dialect; the mpp is
in the resolution tags, in pixels per centimetre.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

_ASCII, _SHORT, _LONG, _RATIONAL, _FLOAT = 2, 3, 4, 5, 11
_FORMAT = {_ASCII: "s", _SHORT: "H", _LONG: "I", _RATIONAL: "I", _FLOAT: "f"}
_YCBCR, _JPEG, _CENTIMETRE = 6, 7, 3
_MCU = 16  # 4:2:0 sampling, as in most scanners' JPEG: a 16×16 MCU
_OBJECTIVE = 40.0
_MACRO_LENS = -1.0

Tag = tuple[int, int, list | bytes]  # (code, type, values)


def _restart_jpeg(image: np.ndarray, quality: int, max_interval_px: int) -> tuple[bytes, list[int]]:
    """The image as one baseline JPEG whose restart intervals tile each MCU row evenly; returns the
    bytes and the offset of every interval's first entropy-coded byte."""
    mcus_per_row = math.ceil(image.shape[1] / _MCU)
    blocks = max(d for d in range(1, max_interval_px // _MCU + 1) if mcus_per_row % d == 0)
    buffer = io.BytesIO()
    Image.fromarray(image).save(
        buffer, format="JPEG", quality=quality, subsampling=2, restart_marker_blocks=blocks
    )
    data = buffer.getvalue()
    sos = data.index(b"\xff\xda")
    starts = [sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]]
    for i in range(starts[0], len(data) - 1):
        if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7:  # RSTn (entropy data stuffs 0xFF as FF 00)
            starts.append(i + 2)
    expected = mcus_per_row * math.ceil(image.shape[0] / _MCU) // blocks
    if len(starts) != expected:
        raise ValueError(f"JPEG holds {len(starts)} restart intervals, not {expected}")
    return data, starts


def _level_image(tiles: Iterator[np.ndarray], width: int, height: int, tile: int) -> np.ndarray:
    """A level assembled from its row-major `tile`-sized tiles, cropped to its size."""
    columns = math.ceil(width / tile)
    canvas = np.zeros((math.ceil(height / tile) * tile, columns * tile, 3), np.uint8)
    for i, piece in enumerate(tiles):
        y, x = divmod(i, columns)
        canvas[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = piece
    return canvas[:height, :width]


class _NdpiFile:
    """Appends pages (data first, then the IFD) and links each IFD from the one before."""

    def __init__(self, handle: io.BufferedWriter) -> None:
        self.handle = handle
        handle.write(b"II*\x00" + struct.pack("<Q", 0))
        self.link_at = 4  # where the offset of the next IFD goes

    def _append(self, data: bytes) -> int:
        offset = self.handle.seek(0, os.SEEK_END)
        self.handle.write(data + b"\x00" * (len(data) % 2))  # TIFF values start on word boundaries
        return offset

    def page(self, strip: bytes, tags: list[Tag]) -> None:
        strip_at = self._append(strip)
        tags = sorted([*tags, (273, _LONG, [strip_at]), (279, _LONG, [len(strip)])])
        entries = []
        for code, kind, values in tags:
            packed = (
                values
                if isinstance(values, bytes)
                else struct.pack(f"<{len(values)}{_FORMAT[kind]}", *values)
            )
            count = len(values) // (2 if kind == _RATIONAL else 1)
            inline = packed.ljust(4, b"\x00") if len(packed) <= 4 else struct.pack("<I", self._append(packed))
            entries.append(struct.pack("<HHI", code, kind, count) + inline)
        ifd = (
            struct.pack("<H", len(entries))
            + b"".join(entries)
            + struct.pack("<Q", 0)
            + b"\x00" * 4 * len(entries)
        )
        ifd_at = self._append(ifd)
        self.handle.seek(self.link_at)
        self.handle.write(struct.pack("<Q", ifd_at))
        self.link_at = ifd_at + 2 + 12 * len(entries)


def _common_tags(image: np.ndarray, lens: float) -> list[Tag]:
    height, width = image.shape[:2]
    return [
        (256, _LONG, [width]),
        (257, _LONG, [height]),
        (258, _SHORT, [8, 8, 8]),
        (259, _SHORT, [_JPEG]),
        (262, _SHORT, [_YCBCR]),
        (271, _ASCII, b"Hamamatsu\x00"),
        (272, _ASCII, b"slidestream synthetic\x00"),
        (277, _SHORT, [3]),
        (278, _LONG, [height]),
        (305, _ASCII, b"slidestream.synthetic\x00"),
        (65420, _LONG, [1]),
        (65421, _FLOAT, [lens]),
    ]


def write_ndpi(
    path: str | os.PathLike,
    levels: list[tuple[int, int, int]],
    level_tiles: Callable[[int, int, int], Iterator[np.ndarray]],
    tile: int,
    mpp: float | None,
    quality: int,
    macro: np.ndarray,
) -> None:
    """Write `levels` ((downsample, width, height), level 0 first) as NDPI pages at 40× and the macro
    photo last. `level_tiles(downsample, width, height)` yields a level's `tile`-sized RGB tiles in row-major
    order."""
    with open(path, "wb") as handle:
        ndpi = _NdpiFile(handle)
        for downsample, width, height in levels:
            image = _level_image(level_tiles(downsample, width, height), width, height, tile)
            strip, starts = _restart_jpeg(image, quality, tile)
            tags = _common_tags(image, _OBJECTIVE / downsample)
            tags.append((65426, _LONG, starts))
            if mpp is not None:
                px_per_cm = round(1e4 / (mpp * downsample) * 1000)
                resolution = [px_per_cm, 1000]
                tags += [
                    (282, _RATIONAL, resolution),
                    (283, _RATIONAL, resolution),
                    (296, _SHORT, [_CENTIMETRE]),
                ]
            ndpi.page(strip, tags)
        strip, _ = _restart_jpeg(macro, quality, tile)
        ndpi.page(strip, _common_tags(macro, _MACRO_LENS))
