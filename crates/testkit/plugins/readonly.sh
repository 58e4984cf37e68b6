#!/bin/sh
# Test plugin (ds): tries to write into its input dir (which must be read-only) and
# reports what happened, both on stdout and in OUTPUTDIR/readonly.txt: "incoming:
# read-only" when every attempt failed, "incoming: WRITABLE" otherwise. Exits 0 either
# way: the report is the result.
#   readonly.sh [--flag value ...] INPUTDIR OUTPUTDIR
set -u

inputdir=""
outputdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --*=*) shift ;;
        --*) [ $# -ge 2 ] || { echo "readonly: $1 needs a value" >&2; exit 2; }; shift 2 ;;
        *) inputdir=$outputdir; outputdir=$1; shift ;;
    esac
done
if [ -z "$inputdir" ] || [ -z "$outputdir" ]; then
    echo "usage: readonly.sh INPUTDIR OUTPUTDIR" >&2
    exit 2
fi

writable=""
if (echo "written by the plugin" > "$inputdir/written-by-plugin") 2>/dev/null; then
    writable="$writable file"
fi
if mkdir "$inputdir/dir-by-plugin" 2>/dev/null; then
    writable="$writable dir"
fi
# Existing inputs must not be changeable or removable either.
for f in "$inputdir"/*; do
    [ -f "$f" ] || continue
    if (echo "changed" >> "$f") 2>/dev/null; then
        writable="$writable append"
    fi
    if rm -f "$f" 2>/dev/null && [ ! -e "$f" ]; then
        writable="$writable remove"
    fi
    break
done

if [ -z "$writable" ]; then
    result="incoming: read-only"
else
    result="incoming: WRITABLE ($writable )"
fi
echo "$result"
echo "$result" > "$outputdir/readonly.txt"
