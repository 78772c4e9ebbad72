#!/usr/bin/env bash
# The main job on the embedded default. Until training lands (issue 4) it is: set-up,
# the size and cost of the published model, and the network's parity with the reference.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
BIN="${MICRODIT_BUILD_DIR:-$ROOT/build}/microdit"
VECTORS="${MICRODIT_VECTORS:-$ROOT/../shared/reference/microdit_parity_a.safetensors}"
echo "== microdit info --preset MicroDiT_XL_2"
"$BIN" info --preset MicroDiT_XL_2
echo
echo "== microdit parity --vectors $VECTORS"
"$BIN" parity --vectors "$VECTORS" |
  awk 'NR <= 5 { print } { last[NR % 6] = $0 } END { print "  ..."; for (i = NR - 5; i <= NR; i++) print last[i % 6] }'
