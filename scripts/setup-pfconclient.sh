#!/usr/bin/env bash
# Installs python-pfconclient 4.0.0 (the client CUBE uses, from PyPI, unmodified) into a
# private virtual environment for the pfcon API tests, and reuses it when it is there:
#
#   eval "$(scripts/setup-pfconclient.sh)"   # exports DISPATCH_TEST_PFCONCLIENT_PYTHON
#
# Needs python3 (3.11 or newer, as pfconclient does) with venv; on Debian, python3-venv
# is installed with apt-get when missing. Everything said for people goes to stderr;
# stdout carries only `export` lines.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${DISPATCH_PFCONCLIENT_VENV:-$PWD/target/pfconclient-venv}"
VERSION=4.0.0
say() { printf 'setup-pfconclient: %s\n' "$*" >&2; }

if ! "$VENV/bin/python" -c "import pfconclient" 2>/dev/null; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
        say "installing python3-venv with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2
    fi
    rm -rf "$VENV"
    python3 -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "python-pfconclient==$VERSION" >&2
    say "python-pfconclient $VERSION installed in $VENV"
fi
"$VENV/bin/python" - <<PY >&2
import importlib.metadata as m
assert m.version("python-pfconclient") == "$VERSION", m.version("python-pfconclient")
PY
echo "export DISPATCH_TEST_PFCONCLIENT_PYTHON=$VENV/bin/python"
