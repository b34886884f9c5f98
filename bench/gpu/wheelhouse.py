"""Build, here, the wheels a bare GPU machine lacks, packed into transfer chunks of bounded size.

The GPU machines we borrow have Python 3.12 with torch, torchvision, timm, numpy, pyarrow, fsspec, pillow,
scikit-learn, matplotlib and tifffile, and cannot reach a package registry; files reach them only with
the working tree, at most `--limit-mib` per call. This script downloads the missing wheels for that
Python (`wheels.txt` beside it), trims the parts we never use (Ray's Java jars, RLlib, Serve, LLM and
dashboard source maps; imagecodecs' codecs other than the JPEG/zlib/LZW family TIFF slides use), and
bin-packs them into `OUT/chunk-1`, `OUT/chunk-2`, … in the order `wheels.txt` lists them, so the first
chunk holds what checks 1–6 need. A wheel larger than a chunk is split into `*.whl.part-K-of-N` files
that `install.sh` joins once every part has arrived.

    python bench/gpu/wheelhouse.py [--out .whl] [--limit-mib 60]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
PLATFORMS = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17", "manylinux2014",
             "manylinux1", "manylinux_2_31", "manylinux_2_34")  # fmt: skip

# What each trimmed wheel drops (paths inside the wheel).
RAY_DROPPED = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")
IMAGECODECS_KEPT = {"_imcd", "_shared", "_shared_cython", "_jpeg", "_jpeg8", "_ljpeg", "_jpegsof3", "_zlib",
                    "_deflate", "_zstd", "_lzma", "_png"}  # fmt: skip


def ray_keeps(name: str) -> bool:
    return not name.startswith(RAY_DROPPED) and not name.endswith(".map")


def imagecodecs_keeps(name: str) -> bool:
    match = re.fullmatch(r"imagecodecs/(_\w+)\.abi3\.so", name)
    return match is None or match.group(1) in IMAGECODECS_KEPT


TRIMS: dict[str, Callable[[str], bool]] = {"ray": ray_keeps, "imagecodecs": imagecodecs_keeps}


def download(requirements: list[str], into: Path) -> None:
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", f"{p}_x86_64")]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.12", "--implementation", "cp", *platform_args, "-d", str(into),
         *requirements],
        check=True,
    )  # fmt: skip


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _needed_libs(wheel: zipfile.ZipFile, kept: set[str]) -> set[str]:
    """Bundled shared libraries (`*.libs/`) that the kept extension modules load, transitively: a library
    is needed when its file name appears in a kept binary (its DT_NEEDED string)."""
    libs = {n for n in wheel.namelist() if re.search(r"\.libs/[^/]+$", n)}
    needed: set[str] = set()
    frontier = [n for n in kept if n.endswith(".so")]
    while frontier:
        data = wheel.read(frontier.pop())
        for lib in libs - needed:
            if lib.rsplit("/", 1)[1].encode() in data:
                needed.add(lib)
                frontier.append(lib)
    return needed


def trim(path: Path, keeps: Callable[[str], bool]) -> None:
    """Rewrite the wheel without the entries `keeps` rejects (and bundled libraries nothing kept loads);
    RECORD lists exactly what stays."""
    with zipfile.ZipFile(path) as src:
        record = next(n for n in src.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
        names = [n for n in src.namelist() if n != record]
        kept = {n for n in names if keeps(n) and not re.search(r"\.libs/[^/]+$", n)}
        kept |= _needed_libs(src, kept)
        trimmed = path.with_suffix(".trimmed")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as dst:
            lines = []
            for name in names:
                if name in kept:
                    data = src.read(name)
                    dst.writestr(src.getinfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
                    lines.append(_record_line(name, data))
            dst.writestr(record, "\n".join([*lines, f"{record},,", ""]))
    trimmed.replace(path)


def project_of(wheel: Path) -> str:
    return wheel.name.split("-", 1)[0].lower().replace("_", "-")


def pack(wheels: list[Path], out: Path, limit: int) -> list[list[str]]:
    """First-fit in the given order; a wheel larger than `limit` is split into parts that open new chunks."""
    chunks: list[list[tuple[str, bytes | Path]]] = []
    sizes: list[int] = []

    def place(name: str, payload: bytes | Path, size: int) -> None:
        for i, used in enumerate(sizes):
            if used + size <= limit:
                chunks[i].append((name, payload))
                sizes[i] += size
                return
        chunks.append([(name, payload)])
        sizes.append(size)

    for wheel in wheels:
        size = wheel.stat().st_size
        if size <= limit:
            place(wheel.name, wheel, size)
            continue
        data = wheel.read_bytes()
        n = -(-size // limit)
        step = -(-size // n)
        for k in range(n):
            part = data[k * step : (k + 1) * step]
            place(f"{wheel.name}.part-{k + 1}-of-{n}", part, len(part))
    listing = []
    for i, chunk in enumerate(chunks, start=1):
        folder = out / f"chunk-{i}"
        folder.mkdir(parents=True)
        for name, payload in chunk:
            if isinstance(payload, Path):
                shutil.copyfile(payload, folder / name)
            else:
                (folder / name).write_bytes(payload)
        listing.append([name for name, _ in chunk])
    return listing


def read_requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".whl", help="where the chunks go (git-ignored)")
    parser.add_argument(
        "--limit-mib", type=float, default=60.0,
        help="bytes per chunk; leave room for the working tree in the 64 MiB a call carries",
    )  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out)
    requirements = read_requirements(HERE / "wheels.txt")
    cache = out / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    download(requirements, cache)
    for old in out.glob("chunk-*"):
        shutil.rmtree(old)
    order = {
        re.split(r"[=<>!~ ]", r, maxsplit=1)[0].lower().replace("_", "-"): i
        for i, r in enumerate(requirements)
    }
    wheels = sorted(
        (w for w in cache.glob("*.whl") if project_of(w) in order), key=lambda w: order[project_of(w)]
    )
    staged = out / "staged"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    for wheel in wheels:
        copy = staged / wheel.name
        shutil.copyfile(wheel, copy)
        if (keeps := TRIMS.get(project_of(wheel))) is not None:
            before = copy.stat().st_size
            trim(copy, keeps)
            print(f"trimmed {wheel.name}: {before / MIB:.1f} → {copy.stat().st_size / MIB:.1f} MiB")
    listing = pack(
        sorted(staged.glob("*.whl"), key=lambda w: order[project_of(w)]), out, int(args.limit_mib * MIB)
    )
    shutil.rmtree(staged)
    (out / "manifest.json").write_text(json.dumps({"chunks": listing}, indent=1))
    for i, names in enumerate(listing, start=1):
        size = sum((out / f"chunk-{i}" / n).stat().st_size for n in names)
        print(f"chunk-{i}: {size / MIB:.1f} MiB, {len(names)} files")


if __name__ == "__main__":
    main()
