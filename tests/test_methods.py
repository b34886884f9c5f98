"""The method table: every kind names a trainer entry that runs it and a function that prints its result,
importable and callable the way `slidestream train` calls them."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import fields

import pytest

from slidestream.cluster.config import Config
from slidestream.trainers.methods import METHODS, TUNABLE, TrainRequest


@pytest.mark.parametrize("kind", list(METHODS))
def test_every_kind_resolves_its_run_and_report(kind: str) -> None:
    method = METHODS[kind]
    request, config = TrainRequest(kind, "run", "out"), Config()
    inspect.signature(method.runner()).bind(request, config)
    inspect.signature(method.reporter()).bind(object())
    if exporter := method.exporter():
        inspect.signature(exporter).bind(request, config)
    assert method.section in Config.model_fields
    assert set(method.needs) <= {f.name for f in fields(TrainRequest)}
    assert (kind in TUNABLE) == (method.tune_target is not None)
    if kind in TUNABLE:
        assert inspect.isclass(method.target_class())


def test_the_table_is_imported_without_its_trainers() -> None:
    """`methods` stays light: the CLI's --help reads it without paying for torch and Ray."""
    code = "import sys, slidestream.trainers.methods; print('torch' in sys.modules, 'ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]
