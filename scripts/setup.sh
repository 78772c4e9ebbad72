#!/usr/bin/env bash
# microdit set-up: Debian packages, the pinned LibTorch (from the PyPI torch wheel,
# kept in a per-user cache shared by every clone), then a CMake + Ninja build.
# Idempotent: a second run only re-checks and does an incremental build.
set -euo pipefail

TORCH_VERSION=2.11.0          # pinned; LibTorch comes from this wheel
NUMPY_VERSION=2.4.6           # test tools only
SAFETENSORS_VERSION=0.8.0     # test tools only
APT_PACKAGES=(cmake ninja-build ccache g++ pkg-config python3-venv
  libyaml-cpp-dev nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev libbenchmark-dev libpng-dev libicu-dev zlib1g-dev
  libfreetype-dev libharfbuzz-dev fonts-noto-color-emoji unicode-data fonts-dejavu-core
  libturbojpeg0-dev libjpeg62-turbo-dev libwebp-dev libzstd-dev libarchive-dev libgloo-dev libssl-dev
  libtcmalloc-minimal4  # the allocator microdit links (CMakeLists.txt, docs/performance.md)
  libcpp-httplib-dev chromium curl)  # microdit serve; its browser and API tests

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${MICRODIT_BUILD_DIR:-$ROOT/build}"
BUILD_TYPE="${MICRODIT_BUILD_TYPE:-RelWithDebInfo}"
log() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages (apt-get only when something is missing).
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

# 2. Python virtual environment holding the torch wheel, in a per-user cache keyed by
#    the pinned versions; the project's .venv is a link to it.
PY="${MICRODIT_PYTHON:-python3}"
PYVER="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/microdit"
VENV="$CACHE/venv-torch${TORCH_VERSION}-py${PYVER}"
STAMP="$VENV/.complete-np${NUMPY_VERSION}-st${SAFETENSORS_VERSION}"
if [ ! -f "$STAMP" ]; then
  log "creating $VENV (torch==$TORCH_VERSION from PyPI; a few GB, once per user)"
  mkdir -p "$CACHE"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "numpy==$NUMPY_VERSION" "safetensors==$SAFETENSORS_VERSION"
  touch "$STAMP"
fi
ln -sfn "$VENV" "$ROOT/.venv"
# Text encoders: Python test tools and the MiniLM / CLIP BPE assets (a failure only skips tests).
"$ROOT/scripts/setup_text.sh" "$VENV" || log "text-encoder assets not installed; their tests will skip"
# Data path: diffusers + Pillow (VAE and preprocessing parity) in the same venv, and
# mosaicml-streaming in a venv of its own (a failure only skips tests).
"$ROOT/scripts/setup_data.sh" "$VENV" || log "data-path test tools not installed; their tests will skip"
TORCH_CMAKE="$("$VENV/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "share", "cmake"))')"

# 3. Configure (once) and build.
if [ ! -f "$BUILD_DIR/build.ninja" ]; then
  log "configuring $BUILD_DIR ($BUILD_TYPE)"
  cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
    -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" >/dev/null
fi
log "building (ninja -C $BUILD_DIR)"
cmake --build "$BUILD_DIR" -- -j"${MICRODIT_JOBS:-$(nproc)}"
