#!/usr/bin/env bash
# Debian's Chromium for the report page's headless-browser test (tests/test_report.py).
#
#   chromium.sh install     apt-get the Debian `chromium` package if no chromium binary is found
#   chromium.sh path        print the chromium binary the tests will use (exit 1 if none)
#
# Idempotent: does nothing when chromium is already installed. Uses `sudo -n` when not root.
set -o errexit -o nounset -o pipefail

log() { echo "chromium.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

find_chromium() {
    local b
    for b in chromium chromium-browser; do
        if command -v "$b" >/dev/null; then
            command -v "$b"
            return 0
        fi
    done
    return 1
}

cmd_install() {
    if find_chromium >/dev/null; then
        return 0
    fi
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "chromium missing and not root (no sudo) to install it"
        sudo=(sudo -n)
    fi
    local t0=$SECONDS out
    out=$(mktemp)
    log "installing chromium with apt-get ..."
    if ! { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium; } >"$out" 2>&1; then
        tail -n 30 "$out" >&2
        rm -f "$out"
        die "apt-get install failed"
    fi
    rm -f "$out"
    find_chromium >/dev/null || die "apt-get installed chromium but no chromium binary is on PATH"
    log "installed in $((SECONDS - t0)) s"
}

case "${1:-}" in
    install) cmd_install ;;
    path) find_chromium ;;
    *)
        sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
