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
# shellcheck source=apt_install.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh"

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
    apt_install chromium chromium
    find_chromium >/dev/null || die "apt-get installed chromium but no chromium binary is on PATH"
}

case "${1:-}" in
    install) cmd_install ;;
    path) find_chromium ;;
    *)
        sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
