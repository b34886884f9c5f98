"""Check 1: the encoder alone, the ceiling the embedding pipeline is measured against.

uint8 tiles already on the device at the encoder's input size go through `TileEncoder.embed` (what the
embedding actors call: normalisation on the device, channels-last and bf16 autocast on CUDA, features
back to the host per batch) for each batch size, then once more with `torch.compile` at the best batch.
tiles/s = tiles ÷ wall time of a pass, after one untimed pass.

    python bench/gpu/ceiling.py --encoders resnet50_trunc timm:vit_large_patch16_224 \
        --batches 64 128 256 512 1024 [--tiles 4096] [--input-px N] [--json FILE]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import device, sync, write_result

from slidestream.pipelines.embed import with_input_px
from slidestream.pipelines.encoders import build_encoder


def measure(encoder, tiles: torch.Tensor, dev: torch.device, batch: int) -> float:
    encoder.embed(tiles[: batch * 2], device=dev, batch_size=batch)  # warm-up (cuDNN plans, allocator)
    sync(dev)
    started = time.perf_counter()
    encoder.embed(tiles, device=dev, batch_size=batch)
    sync(dev)
    return len(tiles) / (time.perf_counter() - started)


def sweep(name: str, args: argparse.Namespace, dev: torch.device) -> dict:
    encoder = build_encoder(name, "random")
    encoder.info = with_input_px(encoder.info, args.input_px)
    px = encoder.info.input_px
    generator = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (args.tiles, px, px, 3), dtype=torch.uint8, generator=generator).to(dev)
    rows = {}
    for batch in args.batches:
        rows[batch] = measure(encoder, tiles, dev, batch)
        print(f"{name} batch {batch}: {rows[batch]:.0f} tiles/s", flush=True)
    best = max(rows, key=rows.__getitem__)
    result = {
        "encoder": name,
        "input_px": px,
        "dim": encoder.info.dim,
        "tiles_per_s": rows,
        "best_batch": best,
    }
    if args.compile:
        started = time.perf_counter()
        encoder.model = torch.compile(encoder.model)
        try:
            compiled = measure(encoder, tiles, dev, best)
            result["compiled"] = {
                "batch": best,
                "tiles_per_s": compiled,
                "compile_s": time.perf_counter() - started,
            }
            print(f"{name} batch {best} compiled: {compiled:.0f} tiles/s", flush=True)
        except Exception as exc:  # a compiler failure is a finding, not the end of the check
            result["compiled"] = {"batch": best, "error": f"{type(exc).__name__}: {exc}"[:500]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoders", nargs="+", default=["resnet50_trunc"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    parser.add_argument("--tiles", type=int, default=4096)
    parser.add_argument("--input-px", type=int, default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = device()
    results = []
    for name in args.encoders:
        results.append(sweep(name, args, dev))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    write_result(args.json, {"device": str(dev), "encoders": results})


if __name__ == "__main__":
    main()
