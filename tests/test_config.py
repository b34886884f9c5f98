from pathlib import Path
from typing import get_args

import pytest
import yaml

from slidestream.cluster.config import Config, ConfigError, TrainConfig, WorkerResources, load_config
from slidestream.trainers.models import MODELS

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_yaml_equals_model_defaults():
    shipped = yaml.safe_load((ROOT / "ray_config.yaml").read_text())
    assert shipped == Config().model_dump(mode="json")


def test_set_overrides_nested_values():
    config = load_config(None, ["tiling.mpp=0.25", "shards.image_format=png", "ray.address=null"])
    assert config.tiling.mpp == 0.25
    assert config.shards.image_format == "png"
    assert config.tiling.key == "mpp0.25_px256"


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"tiling\.tile_size"):
        load_config(None, ["tiling.tile_size=128"])


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"tiling\.mpp"):
        load_config(None, ["tiling.mpp=-1"])
    with pytest.raises(ConfigError, match=r"tiling\.overlap_px"):
        load_config(None, ["tiling.overlap_px=300"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tiling: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("shards:\n  jpeg_quality: loud\n")
    with pytest.raises(ConfigError, match=r"shards\.jpeg_quality"):
        load_config(wrong)


def test_set_needs_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["tiling.mpp"])


def test_the_config_accepts_exactly_the_models_of_the_registry():
    assert set(get_args(TrainConfig.model_fields["model"].annotation)) == set(MODELS)


def test_the_sections_that_train_share_one_declaration_of_their_workers():
    config = Config()
    sections = {name for name in Config.model_fields if isinstance(getattr(config, name), WorkerResources)}
    assert sections == {"train", "cdma", "icmil", "gigassl"}
    for name in sections:
        own = vars(type(getattr(config, name))).get("__annotations__", {})
        for key in set(own) & set(WorkerResources.model_fields):  # only another default (train: auto)
            field = type(getattr(config, name)).model_fields[key]
            assert field.annotation == WorkerResources.model_fields[key].annotation, (
                f"{name}.{key} redeclared"
            )
    assert config.train.workers == "auto" and config.cdma.workers == 1


@pytest.mark.parametrize("section", ["train", "cdma", "icmil", "gigassl"])
def test_worker_settings_are_validated_and_named_in_every_section(section):
    assert load_config(None, [f"{section}.workers=0"]).model_dump()[section]["workers"] == 0  # in-process
    assert load_config(None, [f"{section}.workers=auto"]).model_dump()[section]["workers"] == "auto"
    for key, bad in (("workers", -1), ("cpus_per_worker", 0), ("gpus_per_worker", -1), ("max_failures", -1)):
        with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
            load_config(None, [f"{section}.{key}={bad}"])


def test_paper_recipe_fills_defaults_and_leaves_changed_settings(tmp_path, monkeypatch):
    from slidestream.cluster import recipes

    monkeypatch.setitem(recipes.PAPER_RECIPES, "cdma", {"cdma.epochs": 150, "cdma.noise_p": 0.5})
    shipped = load_config(None, ["cdma.recipe=paper"])
    assert (shipped.cdma.epochs, shipped.cdma.noise_p) == (150, 0.5)
    # --set wins over the recipe, even when it names the default value
    default_epochs = load_config(None, []).cdma.epochs
    explicit = load_config(None, ["cdma.recipe=paper", f"cdma.epochs={default_epochs}"])
    assert explicit.cdma.epochs == default_epochs
    # a file that changed a setting keeps it; a saved run config loads to the same values again
    custom = tmp_path / "custom.yaml"
    custom.write_text("cdma:\n  recipe: paper\n  noise_p: 0.1\n")
    from_file = load_config(custom, [])
    assert (from_file.cdma.epochs, from_file.cdma.noise_p) == (150, 0.1)
    saved = tmp_path / "saved.yaml"
    saved.write_text(from_file.to_yaml())
    assert load_config(saved, []) == from_file
    # without the switch, nothing changes
    assert load_config(custom, ["cdma.recipe=default"]).cdma.epochs == default_epochs


def test_missing_starting_weights_name_the_setting(tmp_path):
    from slidestream.cluster.init_weights import MissingWeightsError, starting_weights

    with pytest.raises(MissingWeightsError, match=r"cdma\.weights.*cdma\.weights=random"):
        starting_weights(None, setting="cdma.weights", needs="a ResNet-50 file")
    with pytest.raises(MissingWeightsError, match="does not exist"):
        starting_weights(str(tmp_path / "nope.pth"), setting="cdma.weights", needs="a ResNet-50 file")
    assert starting_weights("random", setting="cdma.weights", needs="x") is None
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    assert starting_weights(str(weights), setting="cdma.weights", needs="x") == weights
