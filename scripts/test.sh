#!/usr/bin/env bash
# The test command: set-up (idempotent), build, then every test through ctest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
BUILD_DIR="${MICRODIT_BUILD_DIR:-$ROOT/build}"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j"${MICRODIT_JOBS:-$(nproc)}" "$@"
