#!/usr/bin/env bash
# Sets up what the engine-backed tests need on a fresh Debian machine (or a laptop), and
# reuses whatever is already there, so it can run before every test run:
#
#   - a static busybox at /bin/busybox (Debian's busybox-static), from which the tests
#     build their plugin image FROM scratch (crates/testkit/src/images.rs): no registry
#     is needed, and none is reachable on the project's machines;
#   - a Docker engine that answers `docker info`: the running one if any, else Debian's
#     dockerd (docker.io) started here by hand, as the project's backends reference
#     describes (no systemd), with its state under $DISPATCH_ENGINE_STATE (default
#     /tmp/dispatch-engines).
#
#   scripts/setup-engines.sh            # set up; say what was done on stderr
#   eval "$(scripts/setup-engines.sh)"  # ... and export DOCKER_HOST if it had to start one
#   scripts/setup-engines.sh --stop     # stop the dockerd this script started, if any
#
# Environment:
#   DISPATCH_ENGINE_STATE     where a started dockerd keeps its socket, data and log
#   DISPATCH_DOCKERD_FLAGS    extra dockerd flags, e.g. the minimal variant
#                             "--iptables=false --bridge=none --storage-driver vfs"
#   DISPATCH_ENGINE_TIMEOUT   seconds to wait for a started dockerd (default 60)
#
# Everything said for people goes to stderr; stdout carries only `export` lines.
set -euo pipefail

STATE="${DISPATCH_ENGINE_STATE:-/tmp/dispatch-engines}"
DOCKER_STATE="$STATE/docker"
TIMEOUT="${DISPATCH_ENGINE_TIMEOUT:-60}"

say() { printf 'setup-engines: %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

# Runs a command as root: directly, through sudo, or not at all (with the reason).
as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        fail "'$*' needs root, and sudo is not installed: run this script as root, or run that command as root and run this script again"
    fi
}

apt_install() {
    say "installing $* (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# True when /bin/busybox exists and is statically linked (an image FROM scratch has no
# dynamic loader; Debian's plain `busybox` package is dynamic).
busybox_is_static() {
    [[ -x /bin/busybox ]] || return 1
    /bin/busybox true 2>/dev/null || return 1
    # ldd fails on a static binary ("not a dynamic executable").
    if command -v ldd >/dev/null 2>&1 && ldd /bin/busybox >/dev/null 2>&1; then
        return 1
    fi
    return 0
}

# True while the process runs (a zombie left unreaped by a minimal init counts as gone).
alive() {
    [[ -r "/proc/$1/status" ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

docker_answers() {
    command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1
}

stop_started_dockerd() {
    local pidfile="$DOCKER_STATE/dockerd.pid"
    if [[ ! -s "$pidfile" ]]; then
        say "no dockerd started by this script (no $pidfile)"
        return 0
    fi
    local pid
    pid="$(cat "$pidfile")"
    if ! alive "$pid"; then
        say "the dockerd this script started (pid $pid) is not running"
        rm -f "$pidfile"
        return 0
    fi
    say "stopping dockerd (pid $pid)"
    as_root kill -TERM "$pid"
    for _ in $(seq 1 "$TIMEOUT"); do
        alive "$pid" || { say "stopped"; return 0; }
        sleep 1
    done
    fail "dockerd (pid $pid) did not stop within ${TIMEOUT}s"
}

start_dockerd() {
    if ! command -v dockerd >/dev/null 2>&1; then
        apt_install docker.io
    fi
    command -v docker >/dev/null 2>&1 || apt_install docker.io
    as_root mkdir -p "$DOCKER_STATE"
    local socket="$DOCKER_STATE/docker.sock"
    local log="$DOCKER_STATE/dockerd.log"
    local hosts=(--host "unix://$socket")
    local group=()
    # The socket's group: `docker` as usual, or this user's own group when not in it.
    if [[ "$(id -u)" != 0 ]] && ! id -nG | tr ' ' '\n' | grep -qx docker; then
        group=(--group "$(id -gn)")
    fi
    # Also serve the default socket when nothing is there, so every client finds it.
    if [[ "$(id -u)" == 0 && ! -e /var/run/docker.sock ]]; then
        hosts+=(--host unix:///var/run/docker.sock)
    fi
    # A config file of our own: the machine's /etc/docker/daemon.json may set what the
    # flags below set (dockerd refuses a directive given twice). Only its storage driver
    # is carried over (an operator's choice that usually matters, e.g. fuse-overlayfs
    # where overlay2 cannot work), unless the flags name one.
    local config="$DOCKER_STATE/daemon.json" driver=""
    if [[ "${DISPATCH_DOCKERD_FLAGS:-}" != *--storage-driver* && -r /etc/docker/daemon.json ]]; then
        driver="$(sed -n 's/.*"storage-driver"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p' \
            /etc/docker/daemon.json | head -n 1)"
    fi
    if [[ -n "$driver" ]]; then
        printf '{"storage-driver": "%s"}\n' "$driver" | as_root tee "$config" >/dev/null
    else
        echo '{}' | as_root tee "$config" >/dev/null
    fi
    say "starting dockerd: state in $DOCKER_STATE, log in $log${driver:+, storage driver $driver}"
    local pid
    # shellcheck disable=SC2086 # DISPATCH_DOCKERD_FLAGS is a list of flags
    pid="$(as_root sh -c 'nohup "$@" >>"$0" 2>&1 </dev/null & echo $!' "$log" \
        dockerd "${hosts[@]}" "${group[@]}" \
        --config-file "$config" \
        --data-root "$DOCKER_STATE/data" \
        --exec-root "$DOCKER_STATE/exec" \
        --pidfile "$DOCKER_STATE/dockerd.pid" \
        ${DISPATCH_DOCKERD_FLAGS:-})"
    export DOCKER_HOST="unix://$socket"
    local waited=0
    until docker_answers; do
        if ! alive "$pid" || (( waited >= TIMEOUT )); then
            if alive "$pid"; then
                say "dockerd (pid $pid) did not answer within ${TIMEOUT}s; the end of its log ($log):"
            else
                say "dockerd exited; the end of its log ($log):"
            fi
            as_root tail -n 30 "$log" >&2 || true
            fail "no Docker engine (where bridges or iptables are not allowed, try DISPATCH_DOCKERD_FLAGS=\"--iptables=false --bridge=none --storage-driver vfs\")"
        fi
        sleep 1
        waited=$((waited + 1))
    done
    say "dockerd answers at $DOCKER_HOST (after ${waited}s)"
    echo "export DOCKER_HOST=$DOCKER_HOST"
}

if [[ "${1:-}" == "--stop" ]]; then
    stop_started_dockerd
    exit 0
fi
if [[ $# -gt 0 ]]; then
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

# 1. busybox-static.
if busybox_is_static; then
    say "busybox: /bin/busybox is static, nothing to do"
else
    apt_install busybox-static
    busybox_is_static || fail "/bin/busybox is still missing or not static after installing busybox-static"
    say "busybox: installed busybox-static"
fi

# 2. A Docker engine.
if docker_answers; then
    say "docker: an engine answers ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')${DOCKER_HOST:+ at $DOCKER_HOST}), reusing it"
elif [[ -S "$DOCKER_STATE/docker.sock" ]] && DOCKER_HOST="unix://$DOCKER_STATE/docker.sock" docker_answers; then
    # Started by an earlier run of this script.
    say "docker: the engine this script started earlier answers at unix://$DOCKER_STATE/docker.sock"
    echo "export DOCKER_HOST=unix://$DOCKER_STATE/docker.sock"
else
    start_dockerd
fi
