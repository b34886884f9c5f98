#!/usr/bin/env bash
# Single-node Ceph RADOS Gateway (a real S3 server) on 127.0.0.1 for the test suite.
#
#   rgw.sh install                    apt-get the Debian ceph packages if `radosgw` is missing
#   rgw.sh start WORKDIR PORT         start mon + memstore OSD + radosgw (idempotent); PORT 0 = reuse/pick
#   rgw.sh stop WORKDIR               stop every daemon started for WORKDIR and drop its data
#   rgw.sh stop-gateway WORKDIR       stop only radosgw (mon/osd and the data stay): an S3 outage
#   rgw.sh start-gateway WORKDIR [PORT]  start radosgw again (default: the port it had)
#   rgw.sh env WORKDIR                print `export` lines (endpoint + keys) meant for `eval`
#   rgw.sh status WORKDIR             print which daemons run; exit 0 only if S3 answers
#
# Layout inside WORKDIR: ceph.conf, state (ports), s3-keys (0600), mon/, osd/, rgw/, run/, log/.
# Auth between the Ceph daemons is off (loopback only); S3 requests are still SigV4-checked by radosgw
# against the user's keys. Secrets are only ever written to WORKDIR/s3-keys and to `env` output.
#
# Tunables (environment): RGW_START_TIMEOUT (s, default 120), RGW_MEMSTORE_BYTES (OSD capacity held
# in RAM, default 4 GiB), RGW_UID (S3 user, default slidestream), RGW_MIN_FREE_MIB (free space a
# fresh start needs on WORKDIR's filesystem, default 64).
set -o errexit -o nounset -o pipefail

START_TIMEOUT=${RGW_START_TIMEOUT:-120}
MEMSTORE_BYTES=${RGW_MEMSTORE_BYTES:-4294967296}
MIN_FREE_MIB=${RGW_MIN_FREE_MIB:-64}
S3_UID=${RGW_UID:-slidestream}
RGW_NAME=client.rgw.gw

if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY=python3; fi

log() { echo "rgw.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=apt_install.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt_install.sh"

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

# --- paths and checks ---------------------------------------------------------------------------

set_workdir() {  # set_workdir DIR [create]
    [[ -n "${1:-}" ]] || die "WORKDIR missing"
    if [[ "${2:-}" == create ]]; then mkdir -p -- "$1"; fi
    [[ -d "$1" ]] || die "no such WORKDIR: $1"
    W=$(cd -- "$1" && pwd -P)
    [[ "$W" != "/" ]] || die "refusing to use / as WORKDIR"
    # Unix admin sockets are limited to 107 bytes; keep some room for the socket names.
    (( ${#W} <= 70 )) || die "WORKDIR path too long for Ceph admin sockets (${#W} > 70 chars): $W"
    CONF="$W/ceph.conf"
}

lock_workdir() {  # one start/stop at a time per WORKDIR (fd 9; daemons are started with it closed)
    command -v flock >/dev/null || return 0
    exec 9>"$W/.lock"
    flock -w 600 9 || die "timed out waiting for another rgw.sh on $W"
}

check_port() {
    [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 0 && $1 <= 65535 )) || die "bad port: $1"
}

need_binaries() {
    local b
    for b in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph-authtool ceph; do
        command -v "$b" >/dev/null || die "$b not found; run: $0 install"
    done
}

need_free_space() {  # the mon's store and the logs need some room on WORKDIR's filesystem
    local free_mib
    free_mib=$(df -Pm -- "$W" | awk 'NR == 2 {print $4}')
    ((free_mib >= MIN_FREE_MIB)) \
        || die "only ${free_mib} MiB free on the filesystem of $W; the S3 test server needs ${MIN_FREE_MIB} MiB"
}

free_ports() {  # free_ports N -> N free TCP ports on 127.0.0.1, one per line
    "$PY" - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
}

port_free() {  # port_free PORT: nothing listens on 127.0.0.1:PORT (TIME_WAIT leftovers are fine)
    "$PY" - "$1" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
EOF
}

state_get() {  # state_get KEY -> value from WORKDIR/state (empty if none)
    [[ -f "$W/state" ]] || return 0
    sed -n "s/^$1=//p" "$W/state" | tail -n 1
}

# --- processes ----------------------------------------------------------------------------------

pidfile() { echo "$W/run/$1.pid"; }   # $1 = mon.a | osd.0 | client.rgw.gw

daemon_pid() {  # prints the pid if the daemon named $1 for this WORKDIR is alive
    local f pid
    f=$(pidfile "$1")
    [[ -s "$f" ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n "$pid" ]] && alive "$pid" || return 1
    # The pid must still belong to a daemon of this WORKDIR (pids get reused).
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$CONF" || return 1
    echo "$pid"
}

alive() {  # alive PID: process exists and is not a zombie (an unreaped zombie counts as gone)
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n "$st" && "$st" != Z && "$st" != X ]]
}

stop_daemon() {  # stop_daemon NAME [GRACE_S]: TERM, wait up to GRACE_S (default 15), then KILL
    local pid i grace=${2:-15}
    pid=$(daemon_pid "$1") || { rm -f -- "$(pidfile "$1")"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        ((grace < 15)) || log "$1 (pid $pid) did not stop in ${grace} s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
    fi
    rm -f -- "$(pidfile "$1")"
}

stop_rgw() {
    # radosgw drains idle keep-alive connections for ~5 s on SIGTERM; every acknowledged S3 write is
    # already on the OSD, so after a short grace a SIGKILL loses nothing (and is what an outage looks like).
    stop_daemon "$RGW_NAME" 2
}

ceph_cli() { timeout 60 ceph -c "$CONF" --connect-timeout 30 "$@"; }

s3_answers() {  # s3_answers PORT: any HTTP answer from radosgw within 2 s
    "$PY" - "$1" <<'EOF' >/dev/null 2>&1
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=2)
except urllib.error.HTTPError:
    pass  # an S3 error document is an answer too
EOF
}

show_logs() {  # tail of the ceph logs, for error reports
    local f
    for f in "$W"/log/*; do
        [[ -f "$f" ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 -- "$f" >&2
    done
}

FRESH_SETUP=0

fail() {  # error with the tail of the ceph logs; a half-built fresh cluster is stopped again
    log "ERROR: $*"
    show_logs
    if ((FRESH_SETUP)); then
        stop_rgw
        stop_daemon osd.0 3
        stop_daemon mon.a 3
        log "stopped the half-started cluster (logs kept in $W/log)"
    fi
    log "ERROR: $* (logs: $W/log)"
    exit 1
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD... : poll CMD until it succeeds
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@"; do
        ((SECONDS < deadline)) || fail "timed out after ${secs}s waiting for $what"
        sleep 0.25
    done
}

# --- subcommands ----------------------------------------------------------------------------------

cmd_install() {
    if command -v radosgw >/dev/null && command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null \
        && command -v radosgw-admin >/dev/null; then
        return 0
    fi
    apt_install "ceph packages" ceph-mon ceph-osd radosgw ceph-common
}

healthy() {  # healthy PORT: all three daemons alive and S3 answers on PORT
    daemon_pid mon.a >/dev/null && daemon_pid osd.0 >/dev/null && daemon_pid "$RGW_NAME" >/dev/null \
        && [[ -s "$W/s3-keys" ]] && s3_answers "$1"
}

core_alive() {  # mon and osd alive, cluster answers, keys exist
    daemon_pid mon.a >/dev/null && daemon_pid osd.0 >/dev/null && [[ -s "$W/s3-keys" ]] \
        && timeout 15 ceph -c "$CONF" --connect-timeout 10 osd stat >/dev/null 2>&1
}

write_conf() {  # write_conf FSID MON_V2_PORT MON_V1_PORT
    cat >"$CONF" <<EOF
# generated by slidestream/testing/rgw.sh -- single-node test cluster, loopback only
[global]
fsid = $1
mon_host = [v2:127.0.0.1:$2,v1:127.0.0.1:$3]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
# "secure" connection mode needs cephx session keys; daemons (radosgw) default to it towards the mon
ms_mon_client_mode = crc
keyring = $W/keyring
run_dir = $W/run
admin_socket = $W/run/\$name.asok
pid_file = $W/run/\$name.pid
log_file = $W/log/\$name.log
log_to_stderr = false
err_to_stderr = false
mon_cluster_log_file = $W/log/cluster.log
crash_dir = $W/crash
client_mount_timeout = 30
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
# The mon's store is a few MiB: a percentage of a large shared disk says nothing (CI's 470-GB disk
# with 4.7 GiB free is "1 %" and the mon refused to start). need_free_space checks bytes instead.
mon_data_avail_warn = 0
mon_data_avail_crit = -1
# commit map changes quickly (pool creation by radosgw is ~1 s per step with the defaults)
paxos_propose_interval = 0.05
paxos_min_wait = 0.01

[mon]
mon_data = $W/mon/\$name
mon_allow_pool_delete = true

[osd]
osd_data = $W/osd/\$name
osd_objectstore = memstore
memstore_device_bytes = $MEMSTORE_BYTES

[$RGW_NAME]
rgw_data = $W/rgw
rgw_init_timeout = $START_TIMEOUT
rgw_thread_pool_size = 64
EOF
}

wipe() {  # remove everything this script creates inside WORKDIR (never WORKDIR itself)
    rm -rf -- "$W/mon" "$W/osd" "$W/rgw" "$W/run" "$W/crash" "$W/monmap" "$W/keyring" "$W/state" \
        "$W/s3-keys" "$W/s3-keys.tmp"
}

start_rgw() {  # start_rgw PORT
    local port=$1
    if [[ "$port" == 0 ]]; then
        port=$(state_get rgw_port)
        if [[ -z "$port" ]] || ! port_free "$port"; then
            port=$(free_ports 1)
        fi
    fi
    port_free "$port" || fail "port 127.0.0.1:$port is already in use"
    mkdir -p "$W/rgw" "$W/run" "$W/log"
    radosgw -c "$CONF" -n "$RGW_NAME" --rgw_frontends "beast endpoint=127.0.0.1:$port" \
        </dev/null >>"$W/log/$RGW_NAME.out" 2>&1 9>&- || fail "radosgw failed to start"
    sed -i '/^rgw_port=/d' "$W/state"
    echo "rgw_port=$port" >>"$W/state"
    RGW_T0=$SECONDS
    wait_for "$START_TIMEOUT" "radosgw to answer on 127.0.0.1:$port" rgw_ready "$port"
}

rgw_ready() {  # rgw_ready PORT: S3 answers; aborts early if radosgw died (pid file: after a grace period)
    s3_answers "$1" && return 0
    if ((SECONDS - RGW_T0 >= 5)) && ! daemon_pid "$RGW_NAME" >/dev/null; then
        fail "radosgw exited during start-up"
    fi
    return 1
}

create_user() {  # S3 user; its keys go straight from radosgw-admin into WORKDIR/s3-keys (0600)
    rm -f -- "$W/s3-keys.tmp"
    (
        umask 077
        timeout 60 radosgw-admin -c "$CONF" user create --uid="$S3_UID" --display-name="$S3_UID" \
            2>>"$W/log/radosgw-admin.log" | "$PY" -c '
import json, sys
key = json.load(sys.stdin)["keys"][0]
print("access_key=" + key["access_key"])
print("secret_key=" + key["secret_key"])
' >"$W/s3-keys.tmp" 2>>"$W/log/radosgw-admin.log"
    ) || fail "radosgw-admin user create failed"
    chmod 600 "$W/s3-keys.tmp"
    mv -f "$W/s3-keys.tmp" "$W/s3-keys"
}

cmd_start() {
    set_workdir "${1:-}" create
    lock_workdir
    local port=${2:-}
    [[ -n "$port" ]] || die "usage: $0 start WORKDIR PORT"
    check_port "$port"
    need_binaries
    local t0=$SECONDS cur
    cur=$(state_get rgw_port)
    if [[ -n "$cur" ]] && [[ "$port" == 0 || "$port" == "$cur" ]] && healthy "$cur"; then
        log "already running on 127.0.0.1:$cur ($W)"
        return 0
    fi
    if core_alive; then
        # mon/osd and the data are fine: only the gateway is missing or on another port.
        if [[ "$port" != 0 && "$port" != "$cur" ]] && ! port_free "$port"; then
            die "port 127.0.0.1:$port is already in use"
        fi
        stop_rgw
        start_rgw "$port"
        log "gateway (re)started on 127.0.0.1:$(state_get rgw_port) in $((SECONDS - t0)) s ($W)"
        return 0
    fi

    # Fresh cluster.
    [[ "$port" == 0 ]] || port_free "$port" || die "port 127.0.0.1:$port is already in use"
    # The data is dropped anyway: a short grace (memstore would dump its RAM to disk on a clean stop).
    stop_rgw
    stop_daemon osd.0 3
    stop_daemon mon.a 3
    wipe
    need_free_space
    FRESH_SETUP=1
    mkdir -p "$W/mon/mon.a" "$W/osd/osd.0" "$W/rgw" "$W/run" "$W/log" "$W/crash"
    rm -f -- "$W"/log/*
    local fsid osd_uuid ports p2 p1
    fsid=$("$PY" -c 'import uuid; print(uuid.uuid4())')
    osd_uuid=$("$PY" -c 'import uuid; print(uuid.uuid4())')
    ports=$(free_ports 2)
    p2=$(sed -n 1p <<<"$ports")
    p1=$(sed -n 2p <<<"$ports")
    write_conf "$fsid" "$p2" "$p1"
    printf 'fsid=%s\nmon_v2_port=%s\nmon_v1_port=%s\n' "$fsid" "$p2" "$p1" >"$W/state"

    # mon.a (the mkfs wants a keyring even with auth off)
    ceph-authtool --create-keyring "$W/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$p2,v1:127.0.0.1:$p1]" "$W/monmap" \
        >/dev/null
    ceph-mon -c "$CONF" -i a --mkfs --monmap "$W/monmap" --keyring "$W/keyring" \
        >>"$W/log/mon.a.out" 2>&1 || fail "ceph-mon --mkfs failed"
    ceph-mon -c "$CONF" -i a </dev/null >>"$W/log/mon.a.out" 2>&1 9>&- || fail "ceph-mon failed to start"
    wait_for 30 "ceph-mon to answer" mon_up

    # osd.0 on memstore (all data in RAM; mon state is on disk under WORKDIR/mon)
    local id
    id=$(ceph_cli osd create "$osd_uuid" 2>>"$W/log/ceph-cli.log") || fail "ceph osd create failed"
    [[ "$id" == 0 ]] || fail "unexpected OSD id '$id'"
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$W/log/osd.0.out" 2>&1 \
        || fail "ceph-osd --mkfs failed"
    ceph-osd -c "$CONF" -i 0 </dev/null >>"$W/log/osd.0.out" 2>&1 9>&- || fail "ceph-osd failed to start"
    wait_for 60 "osd.0 to come up" osd_up

    start_rgw "$port"
    create_user
    FRESH_SETUP=0
    log "S3 server ready on 127.0.0.1:$(state_get rgw_port) in $((SECONDS - t0)) s ($W)"
}

mon_up() { ceph_cli mon stat >/dev/null 2>&1; }
osd_up() { ceph_cli osd dump 2>/dev/null | grep -q '^osd\.0 up'; }

# Lock an existing WORKDIR for a stop; fails (return 1) when nothing was ever started there.
enter_started_workdir() {
    [[ -n "${1:-}" ]] || die "WORKDIR missing"
    [[ -d "$1" ]] || return 1
    set_workdir "$1"
    lock_workdir
}

cmd_stop() {
    enter_started_workdir "${1:-}" || return 0
    # The data is dropped anyway: a short grace (memstore would dump its RAM to disk on a clean stop).
    stop_rgw
    stop_daemon osd.0 3
    stop_daemon mon.a 3
    wipe
}

cmd_stop_gateway() {
    enter_started_workdir "${1:-}" || return 0
    stop_rgw
}

cmd_start_gateway() {
    set_workdir "${1:-}"
    lock_workdir
    local port=${2:-0}
    check_port "$port"
    need_binaries
    daemon_pid mon.a >/dev/null && daemon_pid osd.0 >/dev/null \
        || die "mon/osd of $W are not running; use: $0 start $W PORT"
    local cur
    cur=$(state_get rgw_port)
    if daemon_pid "$RGW_NAME" >/dev/null && [[ "$port" == 0 || "$port" == "$cur" ]] && s3_answers "$cur"; then
        return 0
    fi
    stop_rgw
    start_rgw "$port"
}

cmd_env() {
    set_workdir "${1:-}"
    [[ -s "$W/s3-keys" ]] || die "no S3 keys in $W (server not started?)"
    local port access secret
    port=$(state_get rgw_port)
    access=$(sed -n 's/^access_key=//p' "$W/s3-keys")
    secret=$(sed -n 's/^secret_key=//p' "$W/s3-keys")
    printf 'export AWS_ENDPOINT_URL=%q\n' "http://127.0.0.1:$port"
    printf 'export AWS_ACCESS_KEY_ID=%q\n' "$access"
    printf 'export AWS_SECRET_ACCESS_KEY=%q\n' "$secret"
    echo 'export AWS_DEFAULT_REGION=us-east-1'
    echo 'export AWS_REQUEST_CHECKSUM_CALCULATION=WHEN_REQUIRED'
    echo 'export AWS_RESPONSE_CHECKSUM_VALIDATION=WHEN_REQUIRED'
}

cmd_status() {
    set_workdir "${1:-}"
    local n pid port
    for n in mon.a osd.0 "$RGW_NAME"; do
        if pid=$(daemon_pid "$n"); then echo "$n: running (pid $pid)"; else echo "$n: stopped"; fi
    done
    port=$(state_get rgw_port)
    if [[ -n "$port" ]] && s3_answers "$port"; then
        echo "s3: answering on http://127.0.0.1:$port"
    else
        echo "s3: not answering"
        return 1
    fi
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start "${2:-}" "${3:-}" ;;
    stop) cmd_stop "${2:-}" ;;
    stop-gateway) cmd_stop_gateway "${2:-}" ;;
    start-gateway) cmd_start_gateway "${2:-}" "${3:-0}" ;;
    env) cmd_env "${2:-}" ;;
    status) cmd_status "${2:-}" ;;
    *) usage ;;
esac
