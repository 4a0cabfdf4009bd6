#!/usr/bin/env bash
# Every test, as CI runs them: the workspace with OpenBLAS, the library's kernels again without it
# (the `gemm` crate's path, the library's default), the library's unit and parity tests on the
# portable (non-SIMD) kernels, the bf16 accuracy test on each bf16 product path, then `blip serve` with the real Python clients, then the Python
# package and its Ray pipeline (their pinned environments are made on first use; the Rust tests
# never need the network). `--workspace` keeps the feature set
# of the first run, so the later passes rebuild nothing but the library without OpenBLAS.
set -euo pipefail
cd "$(dirname "$0")/.."
# blip-py (the Python extension) has no Rust tests and links only into Python: scripts/test-python.sh.
cargo test --release --workspace --exclude blip-py
cargo test --release --workspace --exclude blip-py --lib --no-default-features
BLIP_KERNELS=portable cargo test --release --workspace --exclude blip-py --lib --tests
# bf16 models both ways whatever this CPU would pick: oneDNN's bf16 products, and f32 products.
BLIP_BF16=onednn cargo test --release --workspace --exclude blip-py --test dtype
BLIP_BF16=f32 cargo test --release --workspace --exclude blip-py --test dtype
# blip serve with the real Python clients (huggingface_hub, openai) in a pinned environment.
scripts/test-clients.sh
# The Python package against the CLI, and its Ray Data pipeline on a local Ray.
scripts/test-python.sh
