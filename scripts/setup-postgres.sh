#!/usr/bin/env bash
# Sets up the PostgreSQL the coordinator's tests run against, on a fresh Debian machine (or
# a laptop), and reuses it when it is already running, so it can run before every test run:
#
#   - Debian's postgresql, installed with apt-get if no server binaries are found;
#   - a private, throwaway cluster (initdb + pg_ctl; no systemd needed) owned by the
#     postgres user (or by you, when not root), listening only on 127.0.0.1 on a private
#     port, its socket, data and log under $DISPATCH_POSTGRES_STATE (default
#     /tmp/dispatch-postgres);
#   - a database `dispatch_test`; each test creates (and drops) its own database beside
#     it, so tests run in parallel.
#
#   scripts/setup-postgres.sh            # set up; say what was done on stderr
#   eval "$(scripts/setup-postgres.sh)"  # ... and export DISPATCH_TEST_POSTGRES_URL
#   scripts/setup-postgres.sh --stop     # stop the cluster this script started
#
# Environment:
#   DISPATCH_POSTGRES_STATE    where the cluster keeps its data, socket and log
#   DISPATCH_POSTGRES_PORT     its TCP port on 127.0.0.1 (default 55432)
#   DISPATCH_POSTGRES_TIMEOUT  seconds to wait for it to start (default 60)
#
# The cluster trusts local connections and runs with fsync off: it holds test data only,
# on loopback, and is rebuilt at will. Never point it at data that matters.
#
# Everything said for people goes to stderr; stdout carries only `export` lines.
set -euo pipefail

STATE="${DISPATCH_POSTGRES_STATE:-/tmp/dispatch-postgres}"
PORT="${DISPATCH_POSTGRES_PORT:-55432}"
TIMEOUT="${DISPATCH_POSTGRES_TIMEOUT:-60}"
DATA="$STATE/data"
SOCKET="$STATE/socket"
LOG="$STATE/postgres.log"
DATABASE=dispatch_test

say() { printf 'setup-postgres: %s\n' "$*" >&2; }
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

# The newest installed server's bin directory (Debian keeps them per major version).
server_bin() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$dir" && -x "$dir/pg_ctl" && -x "$dir/initdb" ]] && echo "$dir"
}

# The cluster belongs to `postgres` when we are root (initdb refuses root), else to us.
if [[ "$(id -u)" == 0 ]]; then
    OWNER=postgres
    as_owner() { runuser -u postgres -- "$@"; }
else
    OWNER="$(id -un)"
    as_owner() { "$@"; }
fi

BIN="$(server_bin || true)"

if [[ "${1:-}" == "--stop" ]]; then
    if [[ -z "$BIN" || ! -s "$DATA/postmaster.pid" ]]; then
        say "no cluster started by this script is running (no $DATA/postmaster.pid)"
        exit 0
    fi
    say "stopping the cluster in $DATA"
    as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2
    exit 0
fi
if [[ $# -gt 0 ]]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
fi

# 1. The server binaries.
if [[ -z "$BIN" ]]; then
    say "installing postgresql (apt-get)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
    BIN="$(server_bin || true)"
    [[ -n "$BIN" ]] || fail "postgresql is installed but no /usr/lib/postgresql/*/bin/pg_ctl was found"
fi
PSQL=("$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres)

ready() { "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U postgres -d postgres >/dev/null 2>&1; }

# 2. The cluster: reused when it answers, started when it exists, made when it does not.
if ready; then
    say "reusing the cluster answering on 127.0.0.1:$PORT"
else
    mkdir -p "$STATE"
    if [[ "$(id -u)" == 0 ]]; then
        chown "$OWNER" "$STATE"
    fi
    as_owner mkdir -p "$SOCKET"
    if [[ ! -s "$DATA/PG_VERSION" ]]; then
        say "creating a cluster in $DATA ($("$BIN/postgres" --version))"
        as_owner rm -rf "$DATA"
        as_owner "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 \
            --locale=C.UTF-8 >"$STATE/initdb.log" 2>&1 \
            || { tail -n 20 "$STATE/initdb.log" >&2; fail "initdb failed (log: $STATE/initdb.log)"; }
    fi
    say "starting the cluster on 127.0.0.1:$PORT (log: $LOG)"
    # pg_ctl removes a stale postmaster.pid itself when its process is gone.
    if ! as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t "$TIMEOUT" start -o \
        "-c listen_addresses=127.0.0.1 -p $PORT -k $SOCKET -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" >&2; then
        tail -n 30 "$LOG" >&2 || true
        fail "the cluster did not start (is port $PORT taken? set DISPATCH_POSTGRES_PORT)"
    fi
    ready || fail "the cluster started but does not answer on 127.0.0.1:$PORT"
fi

# 3. The database the tests connect to first.
if [[ "$("${PSQL[@]}" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != 1 ]]; then
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $DATABASE" >&2
    say "created database $DATABASE"
fi

echo "export DISPATCH_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$PORT/$DATABASE"
