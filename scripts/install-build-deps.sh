#!/usr/bin/env bash
# Installs what building blip needs beyond a Rust toolchain: cmake and nasm build the bundled
# libjpeg-turbo that decodes JPEG exactly as PIL does; OpenBLAS (libopenblas-dev, found with
# pkg-config, linked statically) runs the large matrix products; oneDNN (libdnnl2, loaded at run
# time where present) runs bf16 models' products on CPUs with bf16 instructions, and the tests run
# that path on any CPU. Debian/Ubuntu; no-op when present.
set -euo pipefail
if command -v cmake >/dev/null && command -v nasm >/dev/null && pkg-config --exists openblas 2>/dev/null \
    && ldconfig -p | grep -q libdnnl.so.2; then
    exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq cmake nasm pkg-config libopenblas-dev libdnnl2
