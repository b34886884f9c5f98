"""Where a trained network's starting weights come from: a local file, or random init asked for by name.

The papers start several networks from ImageNet weights (CDMA's ResNet-50, Giga-SSL's layer4, ICMIL's
tile embedder). Training one from random init gives a different, usually worse, result, so it is never
implied: a missing setting stops the run with a message that names the setting and the file it needs.
Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

from slidestream.cluster.errors import UsageError

RANDOM_INIT = "random"


class MissingWeightsError(UsageError):
    """A network that the paper starts from pretrained weights has neither a weights file nor `random`."""


def starting_weights(value: str | None, *, setting: str, needs: str) -> Path | None:
    """The local weights file to start from, or None when random init was asked for explicitly.

    `setting` is the dotted config key (named in the errors); `needs` says which file fits, e.g.
    "torchvision ResNet-50 ImageNet weights (resnet50-0676ba61.pth) or a timm resnet50 file".
    """
    if value == RANDOM_INIT:
        return None
    if value is None or not str(value).strip():
        raise MissingWeightsError(
            f"{setting} is not set: the paper starts this network from pretrained weights. Give a local "
            f"file with --set {setting}=PATH ({needs}), or --set {setting}={RANDOM_INIT} to train it from "
            "random initialisation explicitly. Nothing is downloaded."
        )
    path = Path(value).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"{setting}: weights file {value!r} does not exist or is not a file")
    return path
