#!/bin/sh
# Test plugin (fs): leaves a trace of each run in a file shared by all the jobs of a test,
# so the test can count how often, and how concurrently, each job ran. Appends
# "start NAME PID" to --log, sleeps --seconds N (default 1), appends NAME to
# OUTPUTDIR/record.txt, appends "end NAME PID" to --log, and exits 0.
#   record.sh --log FILE --name NAME [--seconds N] [--flag value ...] OUTPUTDIR
# Lines are appended with `>>` (O_APPEND), so concurrent runs never interleave within one.
set -eu

log=""
name=""
seconds=1
outputdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --log) [ $# -ge 2 ] || { echo "record: --log needs a value" >&2; exit 2; }; log=$2; shift 2 ;;
        --name) [ $# -ge 2 ] || { echo "record: --name needs a value" >&2; exit 2; }; name=$2; shift 2 ;;
        --seconds) [ $# -ge 2 ] || { echo "record: --seconds needs a value" >&2; exit 2; }; seconds=$2; shift 2 ;;
        --*=*) shift ;;
        --*) [ $# -ge 2 ] || { echo "record: $1 needs a value" >&2; exit 2; }; shift 2 ;;
        *) outputdir=$1; shift ;;
    esac
done
if [ -z "$log" ] || [ -z "$name" ] || [ -z "$outputdir" ]; then
    echo "usage: record.sh --log FILE --name NAME [--seconds N] OUTPUTDIR" >&2
    exit 2
fi

echo "start $name $$" >> "$log"
echo "record: $name started"
sleep "$seconds"
echo "$name" >> "$outputdir/record.txt"
echo "end $name $$" >> "$log"
echo "record: $name done"
