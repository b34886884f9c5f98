"""WebDataset tile shards: encoding tiles and writing size-bounded tar files.

Sample layout (the data contract): `__key__` = `<slide_id>/<x>_<y>`, `jpg` or `png` = the tile,
`json` = {slide_id, x, y, mpp, tile_px, tissue_frac}. Shard names are deterministic for a slide version
(`shard-<slide_id>-<fingerprint digest>-<chunk>-<part>.tar`), so a task retried after a crash rewrites the
same object instead of adding a duplicate.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np
from PIL import Image

from slidestream.cluster.config import ShardConfig
from slidestream.cluster.storage import filesystem, join, write_bytes_atomic
from slidestream.pipelines.slides import version_digest


@dataclass
class Tile:
    slide_id: str
    x: int
    y: int
    image: bytes  # encoded jpg/png
    meta: dict


def tile_key(slide_id: str, x: int, y: int) -> str:
    return f"{slide_id}/{x}_{y}"


def tile_position(key: str) -> tuple[int, int]:
    """Level-0 (x, y) of a sample key made by `tile_key`."""
    x, y = key.rsplit("/", 1)[1].split("_")
    return int(x), int(y)


def decode_sample(sample: dict) -> np.ndarray:
    """The tile of a shard sample as RGB uint8 (H, W, 3)."""
    data = sample.get("jpg") or sample["png"]
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def encode_image(pixels: np.ndarray, cfg: ShardConfig) -> bytes:
    buffer = io.BytesIO()
    if cfg.image_format == "jpg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=cfg.jpeg_quality)
    else:
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def shard_stem(slide_id: str, fingerprint: str, chunk: int) -> str:
    return f"shard-{slide_id}-{version_digest(fingerprint)}-{chunk:05d}"


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: a rewrite is byte-identical
    return info, io.BytesIO(data)


def _tar_parts(tiles: Iterable[Tile], cfg: ShardConfig) -> Iterator[bytes]:
    """Tar files of the tiles (WebDataset layout), a new one whenever `max_mb` would be exceeded."""
    limit = int(cfg.max_mb * 1024 * 1024)
    buffer, archive = io.BytesIO(), None
    for tile in tiles:
        meta = json.dumps(tile.meta, sort_keys=True).encode()
        if archive is not None and buffer.tell() + len(tile.image) + len(meta) + 3 * 512 > limit:
            archive.close()
            yield buffer.getvalue()
            buffer, archive = io.BytesIO(), None
        if archive is None:
            archive = tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        key = tile_key(tile.slide_id, tile.x, tile.y)
        archive.addfile(*_member(f"{key}.{cfg.image_format}", tile.image))
        archive.addfile(*_member(f"{key}.json", meta))
    if archive is not None:
        archive.close()
        yield buffer.getvalue()


def write_shards(tiles: Iterable[Tile], stage_uri: str, stem: str, cfg: ShardConfig) -> list[tuple[str, int]]:
    """Write the tiles as one or more tars under `stage_uri`; returns (relative name, bytes) per shard."""
    written = []
    for part, data in enumerate(_tar_parts(tiles, cfg)):
        name = f"{stem}-{part:02d}.tar"
        write_bytes_atomic(join(stage_uri, name), data)
        written.append((name, len(data)))
    return written


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **_: object) -> IO[bytes]:
    fs, path = filesystem(url)
    return fs.open(path, mode, block_size=max(bufsize, 8 * 1024 * 1024))


def register_object_store_openers() -> None:
    """webdataset has no opener for object storage: route s3:// (and friends) through fsspec."""
    from webdataset.gopen import gopen_schemes

    for scheme in ("s3", "s3a", "gcs", "az", "abfs"):
        gopen_schemes[scheme] = _fsspec_gopen


def iter_shard_samples(uri: str) -> Iterator[dict]:
    """Samples of one shard (local or object storage) read with webdataset, each member as raw bytes.

    Callers choose the shards each process reads, so webdataset's own splitting is off (its default
    refuses to run inside a multi-process torch.distributed group, e.g. a Ray Train worker)."""
    import webdataset as wds  # imported here: webdataset pulls in torch, which writers do not need

    register_object_store_openers()
    yield from wds.WebDataset(
        uri, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=None
    )
