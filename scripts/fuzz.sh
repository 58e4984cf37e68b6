#!/usr/bin/env bash
# Runs one of the broker's fuzz targets (fuzz/fuzz_targets/) for a bounded time.
#
#   scripts/fuzz.sh TARGET [SECONDS] [-- LIBFUZZER_ARGS...]
#   scripts/fuzz.sh tar_decode 60
#   scripts/fuzz.sh receiver_chunk 300 -- -max_len=65536
#   scripts/fuzz.sh --list
#
# Targets: tar_decode, store_path, receiver_chunk. SECONDS defaults to 60. Not run in CI.
#
# Installs cargo-fuzz (`cargo install cargo-fuzz --locked`) if it is missing.
#
# Toolchain: cargo fuzz needs nightly-only compiler flags (-Zsanitizer=address and the
# sanitizer-coverage passes). This project's machines carry only a stable toolchain, so
# the script sets RUSTC_BOOTSTRAP=1, which lets the stable compiler accept them. That is
# fine for a local fuzzing build and must never be used for a build that ships. If a
# nightly toolchain is installed and you prefer it, run `cargo +nightly fuzz run TARGET`
# from fuzz/ instead.
#
# The corpus grows in fuzz/corpus/TARGET (git-ignored) and starts from the committed seeds
# in fuzz/seeds/TARGET; crashes land in fuzz/artifacts/TARGET (git-ignored). Copy a crash
# that shows a real bug to fuzz/seeds/regressions/TARGET/ and replay it with
#   scripts/fuzz.sh TARGET 0 -- fuzz/seeds/regressions/TARGET/FILE
# (file or directory arguments make libFuzzer run those inputs once instead of fuzzing).
#
# libFuzzer stops at the first crash. To fuzz on past a crash that is already known, add
# `-- -fork=1 -ignore_crashes=1`; every crash is still saved, but the exit status then says
# little: look in fuzz/artifacts/TARGET.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fuzz="$repo/fuzz"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing; installing it" >&2
    cargo install cargo-fuzz --locked
fi

if [[ "${1:-}" == "--list" ]]; then
    cd "$fuzz" && exec cargo fuzz list
fi
if [[ $# -lt 1 || "$1" == -* ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

target="$1"
shift
seconds=60
if [[ $# -gt 0 && "$1" != "--" ]]; then
    seconds="$1"
    shift
fi
if [[ $# -gt 0 && "$1" == "--" ]]; then
    shift
fi

# Arguments that are not options are inputs to replay once (paths relative to where the
# script was started); the rest go to libFuzzer.
files=()
options=()
for arg in "$@"; do
    if [[ "$arg" == -* ]]; then
        options+=("$arg")
    else
        files+=("$(realpath "$arg")")
    fi
done

cd "$fuzz"
# The targets create and delete a directory tree per input: keep that in memory when
# possible rather than on a disk-backed /tmp.
if [[ -z "${TMPDIR:-}" && -d /dev/shm && -w /dev/shm ]]; then
    export TMPDIR=/dev/shm
fi

if [[ ${#files[@]} -gt 0 ]]; then
    # -runs=0: a directory among them is run through once, not fuzzed.
    exec cargo fuzz run "$target" "${files[@]}" -- -runs=0 "${options[@]}"
fi

corpus="corpus/$target"
seeds="seeds/$target"
mkdir -p "$corpus"
dirs=("$corpus")
[[ -d "$seeds" ]] && dirs+=("$seeds")
exec cargo fuzz run "$target" "${dirs[@]}" -- -max_total_time="$seconds" "${options[@]}"
