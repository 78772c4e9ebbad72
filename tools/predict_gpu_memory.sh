#!/usr/bin/env bash
# Predicts what a GPU training step of a preset keeps in memory at a large batch, from two
# small steps on the CPU (`microdit bench --memory`, which counts the bytes of live CPU tensors).
#
#   tools/predict_gpu_memory.sh [PRESET] [TARGET_BATCH] [BENCH ARGS...]
#   tools/predict_gpu_memory.sh MicroDiT_XL_2 256 --low-precision-layernorm   # about 8 minutes
#
# A step keeps (parameters + optimizer state) + (bf16 weight copies) + batch x (activations
# per image). Two CPU batches (8 and 16) give the last two terms; the GPU's peak adds what the
# backward pass holds on top (in session 10 the measured 64.9 GiB was 2.6 GiB above this
# prediction). The CPU steps use ATen's bf16 attention (--cpu-attention bf16) so that attention
# keeps what CUDA's keeps, with --recompute-ffn off and always (the GPU default is on).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${MICRODIT_BUILD_DIR:-$ROOT/build}/microdit"
PRESET="${1:-MicroDiT_XL_2}"
TARGET="${2:-256}"
shift $(( $# >= 2 ? 2 : $# ))
[ -x "$BIN" ] || { echo "error: $BIN not found: build first (./scripts/setup.sh)" >&2; exit 1; }
echo "$PRESET: what one training step keeps after its forward pass, predicted at batch $TARGET"
echo "(CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); bench args: --bf16 ${*:-})"
for recompute in off always; do
  declare -A start kept
  for b in 8 16; do
    line=$("$BIN" bench --preset "$PRESET" --batch "$b" --bf16 --steps 1 --warmup 1 --workers 1 --device cpu \
             --cpu-attention bf16 --recompute-ffn "$recompute" --memory "$@" | grep '^memory of one step')
    start[$b]=$(sed -E 's/.*step: ([0-9.e+-]+) GiB at its start.*/\1/' <<<"$line")
    kept[$b]=$(sed -E 's/.*\+([0-9.e+-]+) GiB kept by the forward pass.*/\1/' <<<"$line")
  done
  python3 - "$recompute" "$TARGET" "${start[8]}" "${kept[8]}" "${kept[16]}" <<'PY'
import sys
mode, target, start, k8, k16 = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:])
per_image = (k16 - k8) / 8
fixed = k8 - 8 * per_image
print(f"recompute-ffn {mode:6}: parameters + optimizer state {start:.2f} GiB, weight copies {fixed:.2f} GiB, "
      f"activations {per_image * 1024:.1f} MiB per image -> {start + fixed + target * per_image:.1f} GiB at batch {target}")
PY
  unset start kept
done
