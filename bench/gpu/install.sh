#!/usr/bin/env bash
# Install one transfer chunk of wheels (made by wheelhouse.py) into a target directory, on a machine with
# no package registry. Split wheels (*.whl.part-K-of-N) wait in TARGET/.parts until all N parts have
# arrived, possibly over several calls, then are joined and installed. Prints the PYTHONPATH to use.
#
#   bash bench/gpu/install.sh CHUNK_DIR [TARGET]        (TARGET defaults to /tmp/slidestream-gpu/site)
set -euo pipefail
chunk=${1:?usage: install.sh CHUNK_DIR [TARGET]}
target=${2:-/tmp/slidestream-gpu/site}
parts=$target/.parts
mkdir -p "$target" "$parts"
python=${PYTHON:-python3}

ready=()
for file in "$chunk"/*; do
    [ -e "$file" ] || continue
    case "$file" in
        *.whl) ready+=("$file") ;;
        *.whl.part-*) cp "$file" "$parts/" ;;
    esac
done
# Join every split wheel whose parts are all here.
for first in "$parts"/*.whl.part-1-of-*; do
    [ -e "$first" ] || continue
    wheel=${first%.part-1-of-*}
    n=${first##*-of-}
    have=$(ls "$wheel".part-*-of-"$n" | wc -l)
    if [ "$have" -eq "$n" ]; then
        for k in $(seq 1 "$n"); do cat "$wheel.part-$k-of-$n"; done > "$wheel"
        rm -f "$wheel".part-*-of-"$n"
        ready+=("$wheel")
    else
        echo "install.sh: $(basename "$wheel"): $have of $n parts so far" >&2
    fi
done
if [ "${#ready[@]}" -gt 0 ]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$target" "${ready[@]}"
    echo "install.sh: installed ${#ready[@]} wheel(s) into $target" >&2
    rm -f "$parts"/*.whl  # joined wheels, once installed
fi
echo "$target"
