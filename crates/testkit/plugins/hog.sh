#!/bin/sh
# Test plugin (fs): holds about --mib N MiB (default 256) in one shell variable, far past
# any small memory limit, so the engine's OOM killer ends it. Should it survive, it says
# so and exits 0, which a test expecting an OOM kill reports as a failure.
#   hog.sh [--mib N] [--flag value ...] OUTPUTDIR
set -eu

mib=256
while [ $# -gt 0 ]; do
    case "$1" in
        --mib) [ $# -ge 2 ] || { echo "hog: --mib needs a value" >&2; exit 2; }; mib=$2; shift 2 ;;
        --*=*) shift ;;
        --*) [ $# -ge 2 ] || { echo "hog: $1 needs a value" >&2; exit 2; }; shift 2 ;;
        *) shift ;;
    esac
done

echo "hog: allocating $mib MiB"
# Command substitution keeps the whole output in the shell's own memory.
x=$(head -c $((mib * 1048576)) /dev/zero | tr '\0' x)
echo "hog: survived holding ${#x} bytes"
