"""A preset encoder's tiling: the µm/px and tile side its authors embedded at, taken wherever the config
leaves the tiling at its default, and a refusal of a tiling that would show the model another scale."""

from __future__ import annotations

from slidestream.cluster.config import Config, ConfigError, TilingConfig, with_values
from slidestream.pipelines.encoder_presets import PRESETS

# How far a tile's width in µm may stray from the preset's before the tiling is refused: every tile is
# resized to the preset's side, so a wider tile shows the network a coarser scale (UNI's 256 px at
# 0.5 µm/px → 224 px is 128 µm across; 224 px at 0.5 µm/px would be 12.5 % off: refused).
SCALE_TOLERANCE = 0.05


def _magnification(mpp: float) -> str:
    return f"~{10 / mpp:.0f}x"


def tile_um(tiling: TilingConfig) -> float:
    return tiling.tile_px * tiling.mpp


def encoder_tiling(config: Config, encoder: str) -> Config:
    """`config` with a preset encoder's tiling where `tiling.mpp` / `tiling.tile_px` are at their defaults
    (other encoders: unchanged); a tiling or input size the preset cannot take is a ConfigError."""
    preset = PRESETS.get(encoder)
    if preset is None:
        return config
    default = TilingConfig()
    values: dict[str, float | int] = {}
    if config.tiling.mpp == default.mpp:
        values["tiling.mpp"] = preset.mpp
    if config.tiling.tile_px == default.tile_px:
        values["tiling.tile_px"] = preset.tile_px
    if values:
        config = with_values(config, values, f"encoder {encoder}")
    wants = (
        f"encoder {encoder!r} embeds {preset.tile_px}-px tiles at {preset.mpp} µm/px "
        f"({_magnification(preset.mpp)}, {preset.tile_px * preset.mpp:g} µm across)"
    )
    if config.embed.input_px not in (None, preset.input_px):
        raise ConfigError(
            f"{wants} at a {preset.input_px}-px input; embed.input_px={config.embed.input_px} "
            "would change its scale: leave embed.input_px null"
        )
    got = tile_um(config.tiling)
    if abs(got / (preset.tile_px * preset.mpp) - 1) > SCALE_TOLERANCE:
        raise ConfigError(
            f"{wants}; tiling.tile_px={config.tiling.tile_px} at tiling.mpp={config.tiling.mpp} is "
            f"{got:g} µm across, another scale for the network. Leave tiling.mpp and tiling.tile_px at "
            f"their defaults to take the preset's, or choose tiles {preset.tile_px * preset.mpp:g} µm "
            "across (tile_px × mpp)"
        )
    return config
