#!/bin/sh
# Test plugin (fs): writes what a broker must not follow or pass on into its output dir:
# a normal file (data.txt), a relative symlink to it (data-link), a symlink out of the
# tree (etc-link -> /etc) and a ChRIS link file (feed.chrislink).
#   links.sh [--flag value ...] OUTPUTDIR
set -eu

outputdir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --*=*) shift ;;
        --*) [ $# -ge 2 ] || { echo "links: $1 needs a value" >&2; exit 2; }; shift 2 ;;
        *) outputdir=$1; shift ;;
    esac
done
[ -n "$outputdir" ] || { echo "usage: links.sh OUTPUTDIR" >&2; exit 2; }

echo "plain data" > "$outputdir/data.txt"
ln -s data.txt "$outputdir/data-link"
ln -s /etc "$outputdir/etc-link"
printf '%s' "home/someone/feeds/feed_1" > "$outputdir/feed.chrislink"
echo "links: wrote data.txt, data-link, etc-link and feed.chrislink"
