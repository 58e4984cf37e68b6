#!/bin/sh
# Test plugin (fs): writes --files N small files (default 100) into its output dir.
#   many.sh [--files N] [--flag value ...] OUTPUTDIR
set -eu

files=100
outputdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --files) [ $# -ge 2 ] || { echo "many: --files needs a value" >&2; exit 2; }; files=$2; shift 2 ;;
        --*=*) shift ;;
        --*) [ $# -ge 2 ] || { echo "many: $1 needs a value" >&2; exit 2; }; shift 2 ;;
        *) outputdir=$1; shift ;;
    esac
done
[ -n "$outputdir" ] || { echo "usage: many.sh [--files N] OUTPUTDIR" >&2; exit 2; }

i=1
while [ "$i" -le "$files" ]; do
    echo "file $i" > "$outputdir/file-$(printf '%06d' "$i").txt"
    i=$((i + 1))
done
echo "many: wrote $files files"
