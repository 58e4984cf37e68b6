#!/usr/bin/env bash
# Makes the Docker engine a one-node swarm for the swarm backend's tests, and reuses the
# swarm when the engine already is in one, so it can run before every test run. Run it
# after scripts/setup-engines.sh, which makes sure an engine answers (backends.md,
# "Swarm", has the recipe this follows):
#
#   eval "$(scripts/setup-engines.sh)"
#   eval "$(scripts/setup-swarm.sh)"   # set up; say what was done on stderr
#   scripts/setup-swarm.sh --stop      # leave the swarm, if this script created it
#
# The swarm listens and advertises on 127.0.0.1 only (`docker swarm init --advertise-addr
# 127.0.0.1 --listen-addr 127.0.0.1:2377`): nothing outside this machine can join it.
# A swarm the engine was already in is used as it is and never left by --stop: this
# script only leaves the swarm it created, as recorded in a marker file holding the
# node's id under $DISPATCH_ENGINE_STATE (default /tmp/dispatch-engines).
#
# Environment:
#   DISPATCH_ENGINE_STATE     where the marker file is kept (shared with setup-engines.sh)
#   DISPATCH_SWARM_PORT       the swarm's listen port on 127.0.0.1 (default 2377)
#
# Everything said for people goes to stderr; stdout carries only `export` lines.
set -euo pipefail

STATE="${DISPATCH_ENGINE_STATE:-/tmp/dispatch-engines}"
MARKER="$STATE/swarm-created-by-setup-swarm"
PORT="${DISPATCH_SWARM_PORT:-2377}"

say() { printf 'setup-swarm: %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

docker_answers() {
    command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1
}

swarm_state() {
    docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null
}

node_id() {
    docker info --format '{{.Swarm.NodeID}}' 2>/dev/null
}

# Find the engine as setup-engines.sh left it: the one DOCKER_HOST (or the default
# socket) names, else the one it started under $STATE, whose DOCKER_HOST is then exported.
if ! docker_answers; then
    if [[ -S "$STATE/docker/docker.sock" ]] \
        && DOCKER_HOST="unix://$STATE/docker/docker.sock" docker_answers; then
        export DOCKER_HOST="unix://$STATE/docker/docker.sock"
        say "using the engine setup-engines.sh started at $DOCKER_HOST"
        echo "export DOCKER_HOST=$DOCKER_HOST"
    else
        fail "no Docker engine answers${DOCKER_HOST:+ at $DOCKER_HOST}: run eval \"\$(scripts/setup-engines.sh)\" first"
    fi
fi

if [[ "${1:-}" == "--stop" ]]; then
    if [[ ! -s "$MARKER" ]]; then
        say "no swarm created by this script (no $MARKER): leaving the engine as it is"
        exit 0
    fi
    created="$(cat "$MARKER")"
    state="$(swarm_state)"
    if [[ "$state" != "active" ]]; then
        say "the engine is in no swarm (state ${state:-unknown}); forgetting $MARKER"
        rm -f "$MARKER"
        exit 0
    fi
    current="$(node_id)"
    if [[ "$current" != "$created" ]]; then
        say "the engine's swarm node ($current) is not the one this script created ($created): leaving it as it is"
        rm -f "$MARKER"
        exit 0
    fi
    say "leaving the swarm this script created (node $current): docker swarm leave --force"
    docker swarm leave --force >&2
    rm -f "$MARKER"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

state="$(swarm_state)"
case "$state" in
    active)
        control="$(docker info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null)"
        [[ "$control" == "true" ]] \
            || fail "the engine is in a swarm but is not a manager of it: the swarm backend needs a manager node"
        say "swarm: the engine is already a swarm manager (node $(node_id)), reusing it"
        ;;
    inactive)
        say "swarm: initialising a one-node swarm on 127.0.0.1:$PORT"
        docker swarm init --advertise-addr 127.0.0.1 --listen-addr "127.0.0.1:$PORT" >/dev/null
        mkdir -p "$STATE"
        node_id >"$MARKER"
        say "swarm: node $(cat "$MARKER") is the swarm's manager; 'scripts/setup-swarm.sh --stop' leaves it"
        ;;
    pending | error | locked | *)
        fail "the engine's swarm state is '${state:-unknown}': fix it (docker swarm leave --force, or unlock it) and run this again"
        ;;
esac
