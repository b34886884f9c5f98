"""The pretrained `resnet10t_64` tile encoder that learning tests and benchmarks share, built once per
directory (a session's temporary directory, or a benchmark's work directory)."""

from __future__ import annotations

from pathlib import Path

from slidestream.trainers.encoder_pretrain import ENCODER, PretrainSettings, pretrain_tile_encoder

# small enough for a test session (16 slides × 64 tiles × 3 epochs, ~30 s on 2 cores); the bench and the
# command line default to 24 × 96 × 4
TEST_PRETRAIN = PretrainSettings(slides=16, tiles_per_slide=64, epochs=3)


def pretrained_encoder(directory: Path, settings: PretrainSettings = TEST_PRETRAIN) -> Path:
    """The weights file of `resnet10t_64` pretrained with `settings`; trained only when not there yet."""
    name = f"{ENCODER}-seed{settings.seed}-{settings.slides}x{settings.tiles_per_slide}x{settings.epochs}.pt"
    path = Path(directory) / name
    if not path.exists():
        pretrain_tile_encoder(path, settings)
    return path
