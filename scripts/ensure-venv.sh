#!/usr/bin/env bash
# scripts/ensure-venv.sh VENV REQUIREMENTS: makes the virtual environment VENV from the pinned
# REQUIREMENTS file (from PyPI), unless VENV was already made from exactly that file.
set -euo pipefail
VENV=$1
REQUIREMENTS=$2
if [ ! -x "$VENV/bin/python" ] || ! cmp -s "$REQUIREMENTS" "$VENV/requirements.txt"; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    cp "$REQUIREMENTS" "$VENV/requirements.txt"
fi
