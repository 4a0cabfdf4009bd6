#!/usr/bin/env bash
# `blip serve` tested with the real Python clients (huggingface_hub, openai), pinned in
# crates/blip-server/tests/clients/requirements.txt and installed into .venv-clients on first
# use (needs PyPI once). Expects target/release/blip (built by the Rust tests).
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS=crates/blip-server/tests/clients/requirements.txt
VENV=.venv-clients
scripts/ensure-venv.sh "$VENV" "$REQUIREMENTS"
[ -x target/release/blip ] || cargo build --release -p blip-cli
"$VENV/bin/python" crates/blip-server/tests/clients/test_clients.py
