"""Slide discovery: a URI prefix or a slide-list CSV → `SlideRef`s with stable ids and fingerprints.

A slide is one file, or several: a DICOM-WSI series is the folder of its instances, an MRXS slide is the
`.mrxs` file and the folder of data files beside it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec

from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.gc_pause import gc_paused
from slidestream.cluster.storage import filesystem, full_uri

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
DICOM_SUFFIX = ".dcm"
_DOUBLE_SUFFIXES = (".ome.tiff", ".ome.tif")


class DiscoveryError(SlidestreamError, ValueError):
    """The slide source itself is unusable (missing prefix, malformed slide list, id clash)."""


@dataclass(frozen=True)
class SlideRef:
    slide_id: str
    uri: str
    size: int
    fingerprint: str  # size + etag (object storage) or mtime (files): changes when the slide changes
    mpp_override: float | None = None


@dataclass
class Discovery:
    slides: list[SlideRef] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (slide_id, uri) listed but absent
    ignored: list[str] = field(default_factory=list)  # files under the prefix that are not slides


def slide_id_from_uri(uri: str) -> str:
    """The file or folder name without its format suffix (`.svs`, `.ome.tiff`, …), made file-name safe."""
    stem = posixpath.basename(uri.rstrip("/"))
    lower = stem.lower()
    double = next((suffix for suffix in _DOUBLE_SUFFIXES if lower.endswith(suffix)), None)
    stem = stem[: -len(double)] if double else (stem.rsplit(".", 1)[0] if "." in stem else stem)
    slide_id = _UNSAFE.sub("_", stem).strip("._")
    if not slide_id:
        raise DiscoveryError(f"cannot derive a slide id from {uri!r}")
    return slide_id


def fingerprint_of(info: dict) -> str:
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}-{str(version).strip(chr(34))}"


def version_digest(fingerprint: str) -> str:
    """A short, file-name-safe digest of a slide version (used in shard and part names)."""
    return hashlib.sha1(fingerprint.encode()).hexdigest()[:8]


def _check_unique(slides: Iterable[SlideRef]) -> None:
    seen: dict[str, str] = {}
    for slide in slides:
        if slide.slide_id in seen:
            raise DiscoveryError(
                f"slide id {slide.slide_id!r} is derived from both {seen[slide.slide_id]} and {slide.uri}; "
                "rename one of them or give explicit slide_id values in a slide list"
            )
        seen[slide.slide_id] = slide.uri


def _companion_folder(path: str) -> str | None:
    """The folder of data files an MRXS slide keeps beside it (`x.mrxs` → `x/`)."""
    return path[: -len(".mrxs")] if path.lower().endswith(".mrxs") else None


def _combined(files: dict[str, dict]) -> tuple[int, str]:
    """(size, fingerprint) of a slide made of several files (a DICOM series, an MRXS slide and its data
    files): any file added, removed or changed changes the fingerprint."""
    size = sum(int(info["size"]) for info in files.values())
    listing = "\n".join(f"{path}:{fingerprint_of(info)}" for path, info in sorted(files.items()))
    return size, f"{size}-{hashlib.sha1(listing.encode()).hexdigest()[:16]}"


def _files_of(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
    """The files one slide is made of: a folder's DICOM instances, an MRXS file and its data files, or
    the file itself."""
    info = fs.info(path)
    if info["type"] == "directory":
        listed = fs.find(path, maxdepth=1, detail=True)
        return {p: i for p, i in listed.items() if p.lower().endswith(DICOM_SUFFIX)}
    files = {path: info}
    companion = _companion_folder(path)
    if companion and fs.isdir(companion):
        files.update(fs.find(companion, detail=True))
    return files


def _companion_files(files: dict[str, dict], extensions: tuple[str, ...]) -> dict[str, dict[str, dict]]:
    """companion folder → the files under it, for every MRXS slide among `files`: one pass over the
    listing, each file checked against its own parent folders (an archive lists 10^5 files and more)."""
    folders = {c for p in files if p.lower().endswith(extensions) and (c := _companion_folder(p))}
    found: dict[str, dict[str, dict]] = {}
    if not folders:
        return found
    for path, info in files.items():
        parent = posixpath.dirname(path)
        while parent and parent not in folders and parent != posixpath.dirname(parent):
            parent = posixpath.dirname(parent)
        if parent in folders:
            found.setdefault(parent, {})[path] = info
    return found


def _size_and_fingerprint(files: dict[str, dict], path: str) -> tuple[int, str]:
    if list(files) == [path]:
        return int(files[path]["size"]), fingerprint_of(files[path])
    return _combined(files)


def current_fingerprint(uri: str) -> str:
    """The fingerprint the slide at `uri` has now (what discovery recorded, unless it changed since)."""
    fs, path = filesystem(uri)
    files = _files_of(fs, path)
    if not files:
        raise FileNotFoundError(f"no slide files at {uri}")
    return _size_and_fingerprint(files, path)[1]


def _from_prefix(source: str, extensions: tuple[str, ...]) -> Discovery:
    """Slide files under `source`. DICOM instances (`.dcm`) are grouped by folder: one folder, one slide.
    An MRXS slide's data folder belongs to it."""
    fs, root = filesystem(source)
    if not fs.exists(root):
        raise DiscoveryError(f"slide source not found: {source}")
    entries = {root: fs.info(root)} if fs.isfile(root) else fs.find(root, detail=True)
    files = {path: info for path, info in entries.items() if info.get("type") != "directory"}
    series: dict[str, dict[str, dict]] = {}
    companions = _companion_files(files, extensions)
    in_companion = {p for parts in companions.values() for p in parts}
    found = Discovery()
    for path in sorted(files):
        info = files[path]
        if path.lower().endswith(DICOM_SUFFIX) and DICOM_SUFFIX in extensions:
            series.setdefault(posixpath.dirname(path), {})[path] = info
        elif path in in_companion:
            continue  # an MRXS data file: part of its slide
        elif not path.lower().endswith(extensions):
            found.ignored.append(full_uri(fs, path))
        else:
            parts = companions.get(_companion_folder(path) or "", {})
            size, fingerprint = _size_and_fingerprint({path: info, **parts}, path)
            uri = full_uri(fs, path)
            found.slides.append(SlideRef(slide_id_from_uri(uri), uri, size, fingerprint))
    for folder, instances in sorted(series.items()):
        size, fingerprint = _combined(instances)
        uri = full_uri(fs, folder)
        found.slides.append(SlideRef(slide_id_from_uri(uri), uri, size, fingerprint))
    found.slides.sort(key=lambda slide: slide.uri)
    return found


def _parse_mpp(value: str | None, where: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise DiscoveryError(f"{where}: mpp {value!r} is not a number") from None
    if not mpp > 0:
        raise DiscoveryError(f"{where}: mpp must be positive, got {value!r}")
    return mpp


def _from_slide_list(source: str) -> Discovery:
    fs, path = filesystem(source)
    if not fs.exists(path):
        raise DiscoveryError(f"slide list not found: {source}")
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(path).decode("utf-8-sig"))))
    if not rows or "uri" not in rows[0]:
        raise DiscoveryError(f"slide list {source} needs a 'uri' column (optional: slide_id, mpp)")
    found = Discovery()
    base = posixpath.dirname(full_uri(fs, path))
    for line, row in enumerate(rows, start=2):
        where = f"{source} line {line}"
        uri = (row.get("uri") or "").strip()
        if not uri:
            raise DiscoveryError(f"{where}: empty uri")
        if "://" not in uri and not uri.startswith("/"):
            uri = f"{base}/{uri}" if "://" in base else posixpath.join(base, uri)
        slide_id = _UNSAFE.sub("_", (row.get("slide_id") or "").strip()) or slide_id_from_uri(uri)
        mpp = _parse_mpp(row.get("mpp"), where)
        slide_fs, slide_path = filesystem(uri)
        if not slide_fs.exists(slide_path):
            found.missing.append((slide_id, uri))
            continue
        size, fingerprint = _size_and_fingerprint(_files_of(slide_fs, slide_path), slide_path)
        found.slides.append(SlideRef(slide_id, uri, size, fingerprint, mpp))
    return found


def discover_slides(source: str, extensions: Iterable[str]) -> Discovery:
    """Slides under a prefix (files with a slide extension) or listed in a CSV (`uri[,slide_id][,mpp]`)."""
    exts = tuple(e.lower() for e in extensions)
    with gc_paused():  # a listing of 10^5 objects makes 10^6 small objects and no cycles
        found = _from_slide_list(source) if source.lower().endswith(".csv") else _from_prefix(source, exts)
    _check_unique([*found.slides, *(SlideRef(sid, uri, -1, "") for sid, uri in found.missing)])
    return found
