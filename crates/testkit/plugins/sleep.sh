#!/bin/sh
# Test plugin (fs): prints "started", sleeps --seconds N (default 60), prints "done".
# It sets no signal handler, like most real plugins: as a container's PID 1 it ignores
# SIGTERM, so whoever stops it must escalate to SIGKILL.
#   sleep.sh [--seconds N] [--flag value ...] OUTPUTDIR
set -eu

seconds=60
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) [ $# -ge 2 ] || { echo "sleep: --seconds needs a value" >&2; exit 2; }; seconds=$2; shift 2 ;;
        --*=*) shift ;;
        --*) [ $# -ge 2 ] || { echo "sleep: $1 needs a value" >&2; exit 2; }; shift 2 ;;
        *) shift ;;
    esac
done

echo "started"
sleep "$seconds"
echo "done"
