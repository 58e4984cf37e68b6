#!/usr/bin/env bash
# Benchmarks. Broker throughput: moves a 1 GiB tree from one dispatch-broker to another over
# loopback and the same tree through `tar | tcp | tar`, then prints both throughputs, their
# ratio and each process's peak RSS (see crates/broker/benches/transfer.rs).
#
# Environment (passed through): BENCH_DIR, BENCH_SCRATCH_DIR, BENCH_RUNS, BENCH_WARMUP, BENCH_LARGE_MIB,
# BENCH_SMALL_FILES, BENCH_SMALL_KIB, BENCH_GZIP=1, BENCH_ENFORCE=1 (exit 1 on a missed
# target), RETAIN_TMP=1, DISPATCH_BROKER_* (reach both brokers). Quick run:
#   BENCH_DIR=/tmp/bench-quick BENCH_LARGE_MIB=64 BENCH_SMALL_FILES=1000 BENCH_SMALL_KIB=16 \
#   BENCH_RUNS=1 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# GNU time reports the tars' peak RSS; GNU tar is the baseline.
if [[ ! -x /usr/bin/time || "$(tar --version 2>/dev/null)" != *"GNU tar"* ]]; then
    sudo=""
    if [[ "$(id -u)" != 0 ]]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq time tar
fi

cargo build --release --bins
cargo bench -p dispatch-broker --bench transfer "$@"

# A trivial job through the manager against `docker run --rm` (crates/manager/bin/benches).
eval "$(scripts/setup-engines.sh)"
cargo bench -p dispatch-manager-bin --bench latency
