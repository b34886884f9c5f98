"""Formats only OpenSlide reads (3DHISTECH MRXS, Hamamatsu VMS/VMU, Sakura SVSLIDE),
through OpenSlide from pip, an optional extra.

OpenSlide reads local files only: a slide on object storage is first copied to local scratch
(`SLIDESTREAM_SCRATCH`, default the system temp dir), together with the folder of data files an MRXS
slide keeps beside it. The copy lives as long as the open handle and is removed when it is closed or
collected; a copy that would leave less than `_RESERVE_BYTES` free is refused (transient: retried later).
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import weakref
from types import ModuleType

import numpy as np

from slidestream.cluster.storage import filesystem, is_local
from slidestream.pipelines.formats.errors import SlideError
from slidestream.pipelines.formats.handle import SlideHandle, as_rgb

OPENSLIDE_EXTRA = "pip install 'slidestream[openslide]'"
OPENSLIDE_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
_RESERVE_BYTES = 2 * 1024**3


def _openslide_module() -> ModuleType:
    try:
        import openslide
    except ImportError:
        raise SlideError(
            "this slide needs OpenSlide, an optional extra that is not installed; "
            f"enable it with: {OPENSLIDE_EXTRA}"
        ) from None
    return openslide


def companion_folder(path: str) -> str | None:
    """The folder of data files beside an MRXS slide (`x.mrxs` → `x/`)."""
    return path[: -len(".mrxs")] if path.lower().endswith(".mrxs") else None


def copy_to_scratch(uri: str) -> tuple[str, str]:
    """Copy a remote slide (and its companion folder) into a new scratch folder; (local path, folder)."""
    fs, path = filesystem(uri)
    sources = [path]
    companion = companion_folder(path)
    if companion and fs.isdir(companion):
        sources.append(companion)
    needed = sum(fs.du(source) for source in sources)
    root = os.environ.get("SLIDESTREAM_SCRATCH") or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    free = shutil.disk_usage(root).free
    if needed + _RESERVE_BYTES > free:
        raise SlideError(
            f"not enough local scratch space to copy the slide for OpenSlide: needs {needed / 1e9:.1f} GB "
            f"plus {_RESERVE_BYTES / 1e9:.0f} GB reserve, {free / 1e9:.1f} GB free in {root} "
            "(set SLIDESTREAM_SCRATCH to a larger disk)",
            permanent=False,
        )
    folder = tempfile.mkdtemp(prefix="slidestream-openslide-", dir=root)
    try:
        for source in sources:
            fs.get(source, os.path.join(folder, posixpath.basename(source)), recursive=source != path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return os.path.join(folder, posixpath.basename(path)), folder


class OpenSlideHandle(SlideHandle):
    backend = "openslide"

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        openslide = _openslide_module()
        self._scratch: weakref.finalize | None = None
        local = uri.removeprefix("file://")
        if not is_local(uri):
            local, folder = copy_to_scratch(uri)
            self._scratch = weakref.finalize(self, shutil.rmtree, folder, True)
        try:
            self.slide = openslide.OpenSlide(local)
        except Exception:
            self.close()
            raise

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(w), int(h)) for w, h in self.slide.level_dimensions)

    @property
    def mpp(self) -> float | None:
        mpp = self.slide.properties.get("openslide.mpp-x")
        return float(mpp) if mpp else None

    @property
    def vendor(self) -> str | None:
        return self.slide.properties.get("openslide.vendor")

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return as_rgb(np.asarray(self.slide.read_region(location, level, size)))

    def close(self) -> None:
        if hasattr(self, "slide"):
            self.slide.close()
        if self._scratch is not None:
            self._scratch()
