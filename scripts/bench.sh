#!/usr/bin/env bash
# Benchmarks. Broker throughput: moves a 1 GiB tree from one dispatch-broker to another over
# loopback and the same tree through `tar | tcp | tar`, then prints both throughputs, their
# ratio and each process's peak RSS (see crates/broker/benches/transfer.rs). Coordinator load:
# submissions/s and submit latency, placements/s with 1,000 simulated sites and 100,000
# queued jobs, and RSS with 100,000 jobs stored (see crates/coordinator/benches/load.rs;
# BENCH_SUBMIT_JOBS, BENCH_CONCURRENCY, BENCH_QUEUE_JOBS, BENCH_SITES, ... are read there).
# pfcon's API: GETs/s, POSTs/s and a large round trip against tar (crates/cli/benches/pfcon.rs).
#
# Environment (passed through): BENCH_DIR, BENCH_SCRATCH_DIR, BENCH_RUNS, BENCH_WARMUP, BENCH_LARGE_MIB,
# BENCH_SMALL_FILES, BENCH_SMALL_KIB, BENCH_GZIP=1, BENCH_ENFORCE=1 (exit 1 on a missed
# target), RETAIN_TMP=1, DISPATCH_BROKER_* (reach both brokers). Quick run:
#   BENCH_DIR=/tmp/bench-quick BENCH_LARGE_MIB=64 BENCH_SMALL_FILES=1000 BENCH_SMALL_KIB=16 \
#   BENCH_RUNS=1 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# GNU time reports the tars' peak RSS; GNU tar is the baseline; wrk drives the pfcon GETs.
if [[ ! -x /usr/bin/time || "$(tar --version 2>/dev/null)" != *"GNU tar"* ]] || ! command -v wrk >/dev/null; then
    sudo=""
    if [[ "$(id -u)" != 0 ]]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq time tar wrk
fi

cargo build --release --bins
cargo bench -p dispatch-broker --bench transfer "$@"

# A trivial job through the manager against `docker run --rm` (crates/manager/bin/benches).
eval "$(scripts/setup-engines.sh)"
cargo bench -p dispatch-manager-bin --bench latency

# Submissions, placements and memory of the real dispatch-coordinator (SQLite) on loopback
# (crates/coordinator/benches/load.rs).
cargo bench -p dispatch-coordinator --bench load

# pfcon's REST API against `dispatch up` (release, local backend): server-info GETs and
# plugin-job POSTs per second against health/ GETs, and an 800 MiB tree of 10,000 files in
# and out against tar over TCP, with peak RSS (crates/cli/benches/pfcon.rs; BENCH_PFCON_*).
cargo bench -p dispatch-cli --bench pfcon
