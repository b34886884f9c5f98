"""Check 2: JPEG tile decoding, PIL on every CPU core against `torchvision.io.decode_jpeg` on the GPU.

The tiles are real shard JPEGs: one synthetic slide is written, its tissue tiles read at the configured
mpp/tile size and encoded as `slidestream` writes shards, then repeated to `--tiles`. PIL: the tiles are
split over a process pool of all cores (the decode `embed` does in its feeding tasks). GPU: batches of
`--batch` encoded tiles decoded on the device in one call. tiles/s over one pass after a warm-up.

    python bench/gpu/jpeg.py [--tiles 20000] [--batch 256] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from common import device, sync, write_result

from slidestream.cluster.config import load_config
from slidestream.pipelines.ingest import planned_chunks
from slidestream.pipelines.reader import read_tiles
from slidestream.pipelines.shards import decode_sample, encode_image
from slidestream.pipelines.synthetic import write_dataset


def shard_jpegs(n: int) -> list[bytes]:
    config = load_config(None, [])
    with tempfile.TemporaryDirectory() as work:
        write_dataset(work, 1, seed=5, size="tiny", fmt="svs")
        encoded = [
            encode_image(tile, config.shards)
            for slide, handle, chunk, plan in planned_chunks(work, config)
            for tile in read_tiles(handle, chunk["xs"], chunk["ys"], plan)
        ]
    return [encoded[i % len(encoded)] for i in range(n)]


def _decode_all(blobs: list[bytes]) -> int:
    return sum(decode_sample({"jpg": blob}).shape[0] > 0 for blob in blobs)


def pil_tiles_per_s(blobs: list[bytes], workers: int) -> float:
    parts = [blobs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_all, [p[:64] for p in parts]))  # start the workers
        started = time.perf_counter()
        decoded = sum(pool.map(_decode_all, parts))
        seconds = time.perf_counter() - started
    assert decoded == len(blobs)
    return len(blobs) / seconds


def gpu_tiles_per_s(blobs: list[bytes], batch: int, dev: torch.device) -> float:
    from torchvision.io import decode_jpeg

    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    decode_jpeg(data[:batch], device=dev)
    sync(dev)
    started = time.perf_counter()
    for i in range(0, len(data), batch):
        decode_jpeg(data[i : i + batch], device=dev)
    sync(dev)
    return len(data) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    blobs = shard_jpegs(args.tiles)
    cores = os.cpu_count() or 1
    result: dict = {
        "tiles": len(blobs),
        "mean_bytes": float(np.mean([len(b) for b in blobs])),
        "cores": cores,
    }
    result["pil_tiles_per_s"] = pil_tiles_per_s(blobs, cores)
    dev = device()
    result["gpu_tiles_per_s"] = gpu_tiles_per_s(blobs, args.batch, dev) if dev.type == "cuda" else None
    write_result(args.json, result)


if __name__ == "__main__":
    main()
