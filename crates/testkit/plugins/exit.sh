#!/bin/sh
# Test plugin (fs): prints a line, then exits with the code given by --code (default 0).
#   exit.sh [--code N] [--flag value ...] OUTPUTDIR
set -eu

code=0
while [ $# -gt 0 ]; do
    case "$1" in
        --code) [ $# -ge 2 ] || { echo "exit: --code needs a value" >&2; exit 2; }; code=$2; shift 2 ;;
        --*=*) shift ;;
        --*) [ $# -ge 2 ] || { echo "exit: $1 needs a value" >&2; exit 2; }; shift 2 ;;
        *) shift ;;
    esac
done

echo "exit: exiting with code $code"
exit "$code"
