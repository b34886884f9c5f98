"""slidestream: whole-slide images in object storage → tiles, features and trained models, on Ray.

One import root. The design card's folders are its floors, mapped into this package by pyproject.toml
(`slidestream.cluster` = `cluster/`, `slidestream.pipelines` = `pipelines/`, `slidestream.trainers` =
`trainers/`); this folder holds the top floor, the command line. Imports point down only:
cluster ← pipelines ← trainers ← command line (`tests/test_layering.py` checks it).

In a source tree that is not installed (a Ray job's uploaded working dir, `python -m slidestream.cli`
from a checkout) the floors are found next to this folder; an installed wheel has them inside it.
"""

from pathlib import Path

_SOURCE_TREE = Path(__file__).resolve().parent.parent
if (_SOURCE_TREE / "pyproject.toml").is_file() and (_SOURCE_TREE / "cluster" / "__init__.py").is_file():
    __path__.append(str(_SOURCE_TREE))

# In a Ray worker of a command run with the console, our log records travel back tagged (see
# cluster/console_routing.py); elsewhere this does nothing.
from slidestream.cluster.console_routing import tag_worker_logs  # noqa: E402

tag_worker_logs()
