# Sourced by the test-support installers (rgw.sh, chromium.sh): `apt_install WHAT PACKAGE…` installs
# Debian packages with apt-get, quietly, with `sudo -n` when not root; on failure it prints apt's last
# lines and exits 1. The caller defines `log` and `die` and checks first whether anything is missing.

apt_install() {
    local what=$1
    shift
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "$what missing and not root (no sudo) to install it"
        sudo=(sudo -n)
    fi
    local t0=$SECONDS out
    out=$(mktemp)
    log "installing $* with apt-get ..."
    if ! { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "$@"; } >"$out" 2>&1; then
        tail -n 30 "$out" >&2
        rm -f "$out"
        die "apt-get install failed"
    fi
    rm -f "$out"
    log "installed in $((SECONDS - t0)) s"
}
