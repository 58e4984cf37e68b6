#!/usr/bin/env bash
# The test command: every tier the project has, in one run, as CI runs it.
#
# Runs on a fresh Debian machine with a Rust toolchain: it installs and starts what the
# engine-backed tests need (scripts/setup-engines.sh: busybox-static for the test image,
# a Docker engine that answers; scripts/setup-postgres.sh: a private PostgreSQL cluster).
# A missing engine fails the tests; nothing is skipped.
#
#   scripts/test.sh              # everything
#   scripts/test.sh -p dispatch-broker --test resume   # extra args go to cargo test
#
# RETAIN_TMP=1 keeps each test's directories and logs for a look after a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "test engines"
eval "$(scripts/setup-engines.sh)"
# The coordinator's store runs its tests on PostgreSQL as well as SQLite.
eval "$(scripts/setup-postgres.sh)"
# The Slurm backend's tests run against a one-node cluster (munge, slurmctld, slurmd).
eval "$(scripts/setup-slurm.sh)"
# The docker backend's conformance suite runs on Podman too, where Podman can start
# containers here; where it cannot, the script says why and those cases are left out.
eval "$(scripts/setup-podman.sh)"
# The swarm backend's conformance suite runs on a one-node swarm of the Docker engine.
eval "$(scripts/setup-swarm.sh)"
# CUBE's own client, python-pfconclient from PyPI, drives the pfcon API tests.
eval "$(scripts/setup-pfconclient.sh)"
# The pfcon large-data case runs at 1 GiB of 20,000 files here (about 6 GiB of disk, one
# minute); DISPATCH_PFCON_LARGE_MIB=5120 runs the full 5 GiB (31 GiB of disk, 6 minutes).
export DISPATCH_PFCON_LARGE_MIB="${DISPATCH_PFCON_LARGE_MIB:-1024}"

# Tests start the real binaries (a killed broker, a killed client), so build them first.
step "building binaries"
cargo build --workspace --bins

if [[ $# -gt 0 ]]; then
    step "cargo test $*"
    cargo test "$@"
    exit 0
fi

# Unit, in-process server, binary and end-to-end tests. Benchmarks are not run here
# (scripts/bench.sh), and neither is fuzzing (scripts/fuzz.sh).
step "tests"
left_out=()
if [[ -n "${DISPATCH_TEST_PODMAN_UNAVAILABLE:-}" ]]; then
    left_out=(--skip podman_engine::)
fi
cargo test --workspace --no-fail-fast --lib --bins --tests -- "${left_out[@]}"
if [[ -n "${DISPATCH_TEST_PODMAN_UNAVAILABLE:-}" ]]; then
    echo "NOT RUN: the Podman conformance cases: $DISPATCH_TEST_PODMAN_UNAVAILABLE"
fi

step "doc tests"
cargo test --workspace --doc

# The example configuration in deploy/ must stay loadable.
step "deploy/ examples"
./target/debug/dispatch-broker --config deploy/broker.example.toml --print-config > /dev/null
echo "deploy/broker.example.toml loads"
./target/debug/dispatch-manager --config deploy/manager.example.toml --print-config > /dev/null
echo "deploy/manager.example.toml loads"
./target/debug/dispatch-coordinator --config deploy/coordinator.example.toml --print-config > /dev/null
echo "deploy/coordinator.example.toml loads"
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "installing docker-compose (apt-get) to check deploy/compose"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi
docker-compose --env-file deploy/compose/site.env.example -f deploy/compose/compose.yaml config -q
echo "deploy/compose/compose.yaml parses"
