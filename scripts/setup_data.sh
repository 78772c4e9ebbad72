#!/usr/bin/env bash
# Data-path test tools (called by scripts/setup.sh; safe to run on its own). Never used at run time.
#  1. diffusers + Pillow in the project venv (VAE parity, Pillow-bicubic preprocessing fixtures),
#     pinned, constrained so pip never replaces the LibTorch wheel.
#  2. mosaicml-streaming in a venv of its own (it pins old huggingface-hub/transformers), in the
#     per-user cache keyed by its version: MDS fixtures and reading our MDS from Python.
# Idempotent: stamp files mark each finished step.
set -euo pipefail

VENV="${1:?usage: setup_data.sh VENV}"
log() { printf '[setup-data] %s\n' "$*"; }

PKGS=(diffusers==0.42.1 pillow==13.0.0)
STAMP="$VENV/.complete-data-$(printf '%s\n' "${PKGS[@]}" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  log "installing Python test tools: ${PKGS[*]}"
  CONSTRAINTS="$(mktemp)"
  "$VENV/bin/python" -m pip freeze | grep -iE '^(torch|numpy|safetensors|transformers|tokenizers)==' > "$CONSTRAINTS"
  "$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "${PKGS[@]}"
  rm -f "$CONSTRAINTS"
  touch "$STAMP"
fi
