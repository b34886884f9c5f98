"""The pretrained tile encoders that learning tests and benchmarks share, built once per directory (a
session's temporary directory, or a benchmark's work directory)."""

from __future__ import annotations

from pathlib import Path

from slidestream.trainers.encoder_pretrain import PretrainSettings, pretrain_tile_encoder

# small enough for a test session (16 slides × 64 tiles × 3 epochs, ~30 s on 2 cores); the bench and the
# command line default to 24 × 96 × 4
TEST_PRETRAIN = PretrainSettings(slides=16, tiles_per_slide=64, epochs=3)


def pretrained_encoder(directory: Path, settings: PretrainSettings = TEST_PRETRAIN) -> Path:
    """The weights file of `settings.encoder` pretrained with `settings`; trained only when not there yet."""
    size = f"{settings.slides}x{settings.tiles_per_slide}x{settings.epochs}"
    ssl = f"-c{settings.contrastive:g}" if settings.contrastive else ""  # the NT-Xent weight, when used
    name = f"{settings.encoder}-seed{settings.seed}-{size}{ssl}.pt"
    path = Path(directory) / name
    if not path.exists():
        pretrain_tile_encoder(path, settings)
    return path
