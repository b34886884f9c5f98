"""The GPU kit's wheelhouse: trimming keeps a wheel installable, packing splits what is too big, and the
installer joins split wheels only once every part has arrived (over several calls, as on a GPU machine)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "bench" / "gpu"


def _wheelhouse():
    spec = importlib.util.spec_from_file_location("wheelhouse", KIT / "wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_wheel(folder: Path, name: str, files: dict[str, bytes]) -> Path:
    """A minimal valid pure-Python wheel holding `files` (paths inside the wheel)."""
    dist = f"{name}-1.0.dist-info"
    meta = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    wheelhouse = _wheelhouse()
    entries = {**files, **meta}
    record = [wheelhouse._record_line(path, data) for path, data in entries.items()]
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for member, data in entries.items():
            wheel.writestr(member, data)
        wheel.writestr(f"{dist}/RECORD", "\n".join([*record, f"{dist}/RECORD,,", ""]))
    return path


def install(chunk: Path, target: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(KIT / "install.sh"), str(chunk), str(target)], env=env, capture_output=True, text=True
    )


def test_split_wheels_install_once_all_parts_arrived(tmp_path: Path) -> None:
    wheelhouse = _wheelhouse()
    staged = tmp_path / "staged"
    staged.mkdir()
    small = make_wheel(staged, "alpha", {"alpha/__init__.py": b"VALUE = 1\n"})
    payload = os.urandom(300_000)  # incompressible: the wheel stays larger than a chunk
    big = make_wheel(staged, "bigpkg", {"bigpkg/__init__.py": b"", "bigpkg/blob.bin": payload})
    listing = wheelhouse.pack([small, big], tmp_path / "out", limit=200_000)

    assert listing[0][0] == small.name
    parts = [name for names in listing for name in names if name.startswith(big.name)]
    assert parts == [f"{big.name}.part-1-of-2", f"{big.name}.part-2-of-2"]
    chunks = sorted((tmp_path / "out").glob("chunk-*"))
    assert all(sum(f.stat().st_size for f in c.iterdir()) <= 200_000 for c in chunks)

    target = tmp_path / "site"
    first, *rest = chunks
    done = install(first, target)
    assert done.returncode == 0, done.stderr
    assert (target / "alpha" / "__init__.py").exists() and not (target / "bigpkg").exists()
    assert "1 of 2 parts" in done.stderr
    for chunk in rest:
        done = install(chunk, target)
        assert done.returncode == 0, done.stderr
    assert (target / "bigpkg" / "blob.bin").read_bytes() == payload
    assert not list((target / ".parts").iterdir())  # the parts are gone once joined


def test_trim_drops_entries_and_unneeded_libraries_and_stays_installable(tmp_path: Path) -> None:
    wheelhouse = _wheelhouse()
    wheel = make_wheel(
        tmp_path,
        "codecs",
        {
            "codecs_pkg/__init__.py": b"",
            "codecs_pkg/_keep.so": b"ELF... needs libkept-1.so ...",
            "codecs_pkg/_drop.so": b"ELF... needs libdropped-2.so ...",
            "codecs_pkg.libs/libkept-1.so": b"ELF... needs libdeep-3.so",
            "codecs_pkg.libs/libdeep-3.so": b"ELF",
            "codecs_pkg.libs/libdropped-2.so": b"ELF",
        },
    )
    wheelhouse.trim(wheel, lambda name: not name.endswith("_drop.so"))
    with zipfile.ZipFile(wheel) as trimmed:
        names = set(trimmed.namelist())
        record = trimmed.read("codecs-1.0.dist-info/RECORD").decode()
    assert "codecs_pkg/_drop.so" not in names and "codecs_pkg.libs/libdropped-2.so" not in names
    assert {"codecs_pkg/_keep.so", "codecs_pkg.libs/libkept-1.so", "codecs_pkg.libs/libdeep-3.so"} <= names
    assert "_drop.so" not in record and "libdeep-3.so" in record

    chunk = tmp_path / "chunk"
    chunk.mkdir()
    os.replace(wheel, chunk / wheel.name)
    done = install(chunk, tmp_path / "site")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "codecs_pkg.libs" / "libdeep-3.so").exists()


@pytest.mark.parametrize("requirement", ["ray==2.60.0", "spconv-cu126==2.3.8"])
def test_wheel_list_names_what_the_gpu_checks_need(requirement: str) -> None:
    assert requirement in _wheelhouse().read_requirements(KIT / "wheels.txt")
