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
# shellcheck source=pip_pinned.sh
. "$(dirname "${BASH_SOURCE[0]}")/pip_pinned.sh"

PKGS=(diffusers==0.42.1 pillow==13.0.0 pytorch-fid==0.3.0 scipy==1.17.1)  # pytorch-fid, scipy: FID parity (tools/make_fid_fixtures.py)
pip_install_pinned "$VENV" data "torch|numpy|safetensors|transformers|tokenizers" "${PKGS[@]}"

# 2. mosaicml-streaming 0.13.0 (MDS fixtures; reading our MDS output from Python). It pins old
#    transformers/huggingface-hub and imports torch, torchvision and transformers at import time,
#    but only its small pure deps are installed here: torch, torchvision and transformers come
#    from the project venv through a .pth file placed after this venv's own site-packages (so
#    this venv's numpy<2.2 wins). No torch download; rebuilt when missing or when pins change.
STREAMING_VERSION=0.13.0
SPKGS=(numpy==2.1.3 xxhash==3.5.0 zstd==1.5.7.2 brotli==1.2.1 python-snappy==0.7.3
  tqdm==4.70.1 catalogue==2.0.10)
PY_VER="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"
SVENV="${MICRODIT_STREAMING_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/microdit/venv-streaming${STREAMING_VERSION}-py${PY_VER}}"
BASE_SITE="$("$VENV/bin/python" -c 'import os, sysconfig; print(os.path.realpath(sysconfig.get_paths()["purelib"]))')"
SSTAMP="$SVENV/.complete-$(printf '%s\n' "${SPKGS[@]}" "$STREAMING_VERSION" "$BASE_SITE" | sha1sum | cut -c1-12)"
if [ ! -f "$SSTAMP" ]; then
  log "creating $SVENV (mosaicml-streaming==$STREAMING_VERSION; torch shared with $VENV)"
  mkdir -p "$(dirname "$SVENV")"
  [ -x "$SVENV/bin/python" ] || "$VENV/bin/python" -m venv "$SVENV"  # same Python as $VENV
  "$SVENV/bin/python" -m pip install -q --no-deps "mosaicml-streaming==$STREAMING_VERSION"
  "$SVENV/bin/python" -m pip install -q "${SPKGS[@]}"
  SSITE="$("$SVENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  printf '%s\n' "$BASE_SITE" > "$SSITE/zz_microdit_torch.pth"
  (cd / && "$SVENV/bin/python" -c 'from streaming import MDSWriter, StreamingDataset
from streaming.base.util import merge_index')
  touch "$SSTAMP"
fi
