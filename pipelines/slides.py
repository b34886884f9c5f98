"""Slide discovery: a URI prefix or a slide-list CSV → `SlideRef`s with stable ids and fingerprints."""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from slidestream.cluster.errors import SlidestreamError
from slidestream.cluster.storage import filesystem, full_uri

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


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
    stem = posixpath.basename(uri.rstrip("/"))
    stem = stem.rsplit(".", 1)[0] if "." in stem else stem
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


def _from_prefix(source: str, extensions: tuple[str, ...]) -> Discovery:
    fs, root = filesystem(source)
    if not fs.exists(root):
        raise DiscoveryError(f"slide source not found: {source}")
    entries = {root: fs.info(root)} if fs.isfile(root) else fs.find(root, detail=True)
    found = Discovery()
    for path in sorted(entries):
        info = entries[path]
        if info.get("type") == "directory":
            continue
        uri = full_uri(fs, path)
        if not path.lower().endswith(extensions):
            found.ignored.append(uri)
            continue
        found.slides.append(SlideRef(slide_id_from_uri(uri), uri, int(info["size"]), fingerprint_of(info)))
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
        info = slide_fs.info(slide_path)
        found.slides.append(SlideRef(slide_id, uri, int(info["size"]), fingerprint_of(info), mpp))
    return found


def discover_slides(source: str, extensions: Iterable[str]) -> Discovery:
    """Slides under a prefix (files with a slide extension) or listed in a CSV (`uri[,slide_id][,mpp]`)."""
    exts = tuple(e.lower() for e in extensions)
    found = _from_slide_list(source) if source.lower().endswith(".csv") else _from_prefix(source, exts)
    _check_unique([*found.slides, *(SlideRef(sid, uri, -1, "") for sid, uri in found.missing)])
    return found
