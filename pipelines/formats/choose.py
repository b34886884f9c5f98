"""Which backend reads a slide, decided by its first bytes rather than its name."""

from __future__ import annotations

from typing import Literal, get_args

from slidestream.cluster.storage import filesystem
from slidestream.pipelines.formats.errors import SlideError
from slidestream.pipelines.formats.handle import SlideHandle
from slidestream.pipelines.formats.openslide_reader import OPENSLIDE_SUFFIXES

Backend = Literal["tiffslide", "wsidicom", "openslide"]
BACKENDS: tuple[str, ...] = get_args(Backend)
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_DICOM_PREAMBLE = 128  # a DICOM file is 128 bytes of preamble, then b"DICM"


def detect_backend(uri: str) -> Backend:
    """tiffslide for TIFF content, wsidicom for DICOM content or a folder (a DICOM series), OpenSlide
    for the formats only it reads (by suffix: their files have no common signature)."""
    fs, path = filesystem(uri)
    if fs.info(path)["type"] == "directory":
        return "wsidicom"
    head = fs.cat_file(path, start=0, end=_DICOM_PREAMBLE + 4)
    if head[:4] in _TIFF_MAGICS:
        return "tiffslide"
    if head[_DICOM_PREAMBLE : _DICOM_PREAMBLE + 4] == b"DICM":
        return "wsidicom"
    if path.lower().endswith(OPENSLIDE_SUFFIXES):
        return "openslide"
    raise SlideError(
        f"not a slide format slidestream reads: the file starts with {head[:8]!r}, which is neither TIFF "
        f"nor DICOM, and its name does not end with {', '.join(OPENSLIDE_SUFFIXES)} (OpenSlide formats)"
    )


def open_handle(uri: str, backend: Backend | None = None) -> SlideHandle:
    """Open `uri` with `backend`, or with the backend its content asks for."""
    chosen = backend or detect_backend(uri)
    if chosen == "tiffslide":
        from slidestream.pipelines.formats.tiff_reader import TiffHandle

        return TiffHandle(uri)
    if chosen == "wsidicom":
        from slidestream.pipelines.formats.dicom_reader import DicomHandle

        return DicomHandle(uri)
    if chosen == "openslide":
        from slidestream.pipelines.formats.openslide_reader import OpenSlideHandle

        return OpenSlideHandle(uri)
    raise ValueError(f"unknown slide backend {chosen!r}; choose from {', '.join(BACKENDS)}")
