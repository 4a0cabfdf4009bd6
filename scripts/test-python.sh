#!/usr/bin/env bash
# The Python package (crates/blip-py): its pinned test environment (.venv-py, from
# crates/blip-py/requirements-test.txt, made on first use; needs PyPI once), the package built
# into it with maturin, then pytest: every task and input kind against the `blip` program, error
# classes, threads, and the Ray Data pipeline on a local Ray. Expects target/release/blip (built by
# the Rust tests).
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS=crates/blip-py/requirements-test.txt
VENV=.venv-py
scripts/ensure-venv.sh "$VENV" "$REQUIREMENTS"
[ -x target/release/blip ] || cargo build --release -p blip-cli
VIRTUAL_ENV="$PWD/$VENV" PATH="$PWD/$VENV/bin:$PATH" maturin develop --release --quiet -m crates/blip-py/Cargo.toml
# A hung Ray worker must not hang CI: a time limit, and whatever Ray left running stopped.
trap '"$VENV/bin/ray" stop --force >/dev/null 2>&1 || true' EXIT
timeout --kill-after=30 1200 "$VENV/bin/python" -m pytest -q -p no:cacheprovider crates/blip-py/tests
