#!/usr/bin/env bash
# Sets up Podman for the docker backend's Podman tests, and reuses what is already there:
# Debian's podman and runc, a containers.conf that lets Podman start containers on the
# project's machines, and `podman system service` serving Docker's API on a private
# socket (the docker backend talks to Podman through it).
#
#   eval "$(scripts/setup-podman.sh)"   # exports DISPATCH_TEST_PODMAN_HOST and CONTAINERS_CONF
#   scripts/setup-podman.sh --stop      # stop the service this script started
#
# Why the containers.conf (backends.md): Debian's crun refuses cgroups in hybrid mode, so
# the runtime is runc; Podman's default ulimits exceed the hard limits of a sandbox
# without CAP_SYS_RESOURCE, so they are set to the hard limits.
#
# Where Podman cannot start a container here, this says exactly why on stderr and exports
# DISPATCH_TEST_PODMAN_UNAVAILABLE with the reason instead: the test command then prints
# the reason and does not run the Podman cases (they are not counted as passed).
#
# Environment: DISPATCH_ENGINE_STATE (default /tmp/dispatch-engines): Podman's socket,
# config and log go in its podman/ directory.
# Everything said for people goes to stderr; stdout carries only `export` lines.
set -euo pipefail

STATE="${DISPATCH_ENGINE_STATE:-/tmp/dispatch-engines}/podman"
SOCKET="$STATE/podman.sock"
CONF="$STATE/containers.conf"
say() { printf 'setup-podman: %s\n' "$*" >&2; }

unavailable() {
    say "Podman cannot run containers here: $*"
    printf 'export DISPATCH_TEST_PODMAN_UNAVAILABLE=%q\n' "$*"
    exit 0
}

alive() {
    [[ -r "/proc/$1/status" ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null
}

answers() {
    curl -fsS --max-time 5 --unix-socket "$SOCKET" http://d/v1.41/version >/dev/null 2>&1
}

if [[ "${1:-}" == "--stop" ]]; then
    if [[ -s "$STATE/service.pid" ]] && alive "$(cat "$STATE/service.pid")"; then
        kill -TERM "$(cat "$STATE/service.pid")"
        say "stopped podman system service (pid $(cat "$STATE/service.pid"))"
    else
        say "no podman system service started by this script"
    fi
    rm -f "$STATE/service.pid"
    exit 0
fi

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if (( ${#missing[@]} > 0 )); then
    if [[ "$(id -u)" != 0 ]]; then
        unavailable "${missing[*]} not installed, and installing needs root (apt-get install -y podman runc curl)"
    fi
    say "installing ${missing[*]} (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >&2; then
        unavailable "apt-get could not install ${missing[*]}"
    fi
fi

mkdir -p "$STATE"
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[[ "$nofile" == unlimited ]] && nofile=1048576
if [[ "$nproc" == unlimited ]] || (( nproc > 32768 )); then nproc=32768; fi
cat > "$CONF" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
export CONTAINERS_CONF="$CONF"

# Can Podman start a container at all? A one-file image imported from a tarball (no
# registry), run once.
probe="$STATE/probe"
rm -rf "$probe" && mkdir -p "$probe/bin"
if [[ ! -x /bin/busybox ]]; then
    unavailable "/bin/busybox is missing (scripts/setup-engines.sh installs busybox-static)"
fi
cp /bin/busybox "$probe/bin/busybox"
if ! out=$(tar -C "$probe" -c bin | podman import - localhost/dispatch-podman-probe:latest 2>&1); then
    unavailable "podman import failed: ${out##*$'\n'}"
fi
if ! out=$(podman run --rm --network none localhost/dispatch-podman-probe:latest /bin/busybox true 2>&1); then
    unavailable "podman run failed: ${out##*$'\n'}"
fi
say "podman $(podman --version | awk '{print $3}') starts containers (runtime runc)"

if answers; then
    say "podman system service answers at unix://$SOCKET, reusing it"
else
    rm -f "$SOCKET"
    # Started in its state dir: conmon leaves files (`oom` after an OOM kill) in the
    # service's working directory.
    (
        cd "$STATE" || exit 1
        nohup podman system service --time=0 "unix://$SOCKET" \
            >>"$STATE/service.log" 2>&1 </dev/null &
        echo $! > "$STATE/service.pid"
    )
    for _ in $(seq 1 30); do
        answers && break
        alive "$(cat "$STATE/service.pid")" || unavailable "podman system service exited: $(tail -n 1 "$STATE/service.log")"
        sleep 1
    done
    answers || unavailable "podman system service did not answer within 30 s (log: $STATE/service.log)"
    say "podman system service answers at unix://$SOCKET (log: $STATE/service.log)"
fi
echo "export CONTAINERS_CONF=$CONF"
echo "export DISPATCH_TEST_PODMAN_HOST=unix://$SOCKET"
