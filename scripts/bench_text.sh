#!/usr/bin/env bash
# Text-encoder throughput on this machine (docs/text-encoders.md): captions per second
# (tokenizing + encoding, after loading) and peak resident memory, for MiniLM and for a
# ViT-H-14-sized OpenCLIP tower (random weights: speed does not depend on their values).
#   scripts/bench_text.sh [N_MINILM=256] [N_CLIP=32] [THREADS=0: LibTorch's default]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${MICRODIT_BIN:-${MICRODIT_BUILD_DIR:-$ROOT/build}/microdit}"
N_MINILM="${1:-256}"; N_CLIP="${2:-32}"; THREADS="${3:-0}"
CAPS="$(mktemp)"; trap 'rm -f "$CAPS"' EXIT
# The parity captions, cycled to N lines (newlines inside a caption become spaces).
python3 -c 'import json,sys; c=[x.replace("\n"," ").replace("\r"," ") for x in json.load(open(sys.argv[1]))]
print("\n".join(c[i % len(c)] for i in range(int(sys.argv[2]))))' "$ROOT/tests/data/text_captions.json" \
  "$((N_MINILM > N_CLIP ? N_MINILM : N_CLIP))" > "$CAPS"
run() {  # encoder, captions, batch size
  echo "== $1, $2 captions, batch $3"
  head -n "$2" "$CAPS" > "$CAPS.$2"
  /usr/bin/time -f "peak RSS %M KiB, wall %e s (with loading)" "$BIN" encode-text --encoder "$1" \
    --captions "$CAPS.$2" --batch-size "$3" --threads "$THREADS" 2>&1 >/dev/null | tr '\r' '\n' | tail -2
  rm -f "$CAPS.$2"
}
uptime
run minilm "$N_MINILM" 1
run minilm "$N_MINILM" 32
run clip-vit-h-14:random "$N_CLIP" 1
run clip-vit-h-14:random "$N_CLIP" 16
