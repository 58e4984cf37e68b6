#!/bin/sh
# Test plugin (fs): prints "line 1" to "line N" (--lines N, default 30), one every 0.1 s,
# for log tail and follow tests.
#   chatty.sh [--lines N] [--flag value ...] OUTPUTDIR
set -eu

lines=30
while [ $# -gt 0 ]; do
    case "$1" in
        --lines) [ $# -ge 2 ] || { echo "chatty: --lines needs a value" >&2; exit 2; }; lines=$2; shift 2 ;;
        --*=*) shift ;;
        --*) [ $# -ge 2 ] || { echo "chatty: $1 needs a value" >&2; exit 2; }; shift 2 ;;
        *) shift ;;
    esac
done

i=1
while [ "$i" -le "$lines" ]; do
    echo "line $i"
    i=$((i + 1))
    [ "$i" -gt "$lines" ] || sleep 0.1
done
