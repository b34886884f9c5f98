#!/usr/bin/env bash
# The GPU kit's one entry point. On a CUDA machine: install the carried wheel chunk(s) and this checkout
# into a target directory (no registry needed), then run every check (bench/gpu/checks.py) and write
# gpu-results.json + gpu-results.md to the output directory. `--cpu` rehearses the same script here.
#
#   bash bench/gpu/run.sh [--cpu] [--out DIR] [--wheels CHUNK_DIR ...] [--only CHECK ...]
#
# OUT defaults to $OUT (the device tool's output folder) or ./gpu-results. Wheel chunks are made here by
# `python bench/gpu/wheelhouse.py` (see bench/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-results}
cpu=()
only=()
chunks=()
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) cpu=(--cpu) ;;
        --out) out=$2; shift ;;
        --wheels) chunks+=("$2"); shift ;;
        --only) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do only+=("$1"); shift; done; continue ;;
        *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ ${#cpu[@]} -gt 0 ] && python=.venv/bin/python
site=/tmp/slidestream-gpu/site
for chunk in "${chunks[@]}"; do
    PYTHON=$python bash bench/gpu/install.sh "$chunk" "$site" >/dev/null
done
if [ ${#chunks[@]} -gt 0 ] || [ -d "$site" ]; then
    # this checkout itself, so Ray's worker processes import it like an installed package
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 SLIDESTREAM_PROGRESS=0 RAY_DEDUP_LOGS=0
args=(--out "$out" "${cpu[@]}")
[ ${#only[@]} -gt 0 ] && args+=(--only "${only[@]}")
exec "$python" bench/gpu/checks.py "${args[@]}"
