#!/bin/sh
# Test plugin (ds): copies everything in its input dir to its output dir, then writes
# run.json there with the uid and gid it ran as, so a suite can check who wrote outputs.
#   copy.sh [--flag value ...] INPUTDIR OUTPUTDIR
# Runs under busybox sh and any POSIX sh. Exit 2 on a usage error.
set -eu

inputdir=""
outputdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --*=*) shift ;;
        --*) [ $# -ge 2 ] || { echo "copy: $1 needs a value" >&2; exit 2; }; shift 2 ;;
        *) inputdir=$outputdir; outputdir=$1; shift ;;
    esac
done
if [ -z "$inputdir" ] || [ -z "$outputdir" ]; then
    echo "usage: copy.sh [--flag value ...] INPUTDIR OUTPUTDIR" >&2
    exit 2
fi

echo "copy: from $inputdir to $outputdir"
# `dir/.` copies the directory's contents, hidden names included, and works on an empty one.
cp -R "$inputdir/." "$outputdir/"
files=$(find "$inputdir" -type f | wc -l | tr -d ' ')
uid=$(id -u)
gid=$(id -g)
printf '{"plugin": "copy", "uid": %s, "gid": %s, "files": %s}\n' "$uid" "$gid" "$files" \
    > "$outputdir/run.json"
echo "copy: copied $files files as $uid:$gid"
