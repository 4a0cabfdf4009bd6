#!/usr/bin/env bash
# Every test, as CI runs them (no network, no Python): the workspace with OpenBLAS, the library's
# kernels again without it (the `gemm` crate's path, the library's default), and the library's
# unit and parity tests on the portable (non-SIMD) kernels. `--workspace` keeps the feature set
# of the first run, so the later passes rebuild nothing but the library without OpenBLAS.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --workspace
cargo test --release --workspace --lib --no-default-features
BLIP_KERNELS=portable cargo test --release --workspace --lib --tests
