#!/usr/bin/env bash
# On a lent GPU machine: unpacks .gpu/carry.tar.xz (tools/gpu_carry.sh), points the loader at
# the carried libraries, the machine's torch and its CUDA libraries, and runs one part of
# tools/bench_gpu_vs_reference.sh (1, 2, 3, or all).
#   bash tools/gpu_run.sh 1|2|3|all
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
G="$ROOT/.gpu"
[ -f "$G/carry.tar.xz" ] || { echo "error: no .gpu/carry.tar.xz: run tools/gpu_carry.sh and carry .gpu" >&2; exit 1; }
# Python's tarfile, not xz(1): the machine has python3 for its torch, maybe not xz.
[ -x "$G/bin/microdit" ] || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
  "$G/carry.tar.xz" "$G" || exit 1
TP=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
# The CUDA libraries of the torch wheel live in site-packages/nvidia/*/lib.
NV=$(ls -d "$(dirname "$TP")"/nvidia/*/lib 2>/dev/null | paste -sd: -)
export LD_LIBRARY_PATH="$G/lib:$TP/lib${NV:+:$NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$G/bin/microdit" --version 2>&1 | head -n 1 || true
PART=${1:-all} exec "$ROOT/tools/bench_gpu_vs_reference.sh" "$G/ref" "$G/bin/microdit" "$G/bin/microdit_tests"
