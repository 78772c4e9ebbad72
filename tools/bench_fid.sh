#!/usr/bin/env bash
# Inception-v3 (FID) throughput: microdit eval fid vs pytorch-fid 0.3.0 on the same 64 PNGs
# (256x256, random weights from tools/make_fid_fixtures.py), batch 32, same machine, same run.
# Usage: tools/bench_fid.sh BUILD_DIR WORK_DIR   (run under mlock on the shared machine)
set -euo pipefail
B="$1/microdit"; W="$2"; ROOT="$(cd "$(dirname "$0")/.." && pwd)"; PY="$ROOT/.venv/bin/python"
mkdir -p "$W/imgs"
[ -f "$W/fx/fid_inception_random.pth" ] || "$PY" "$ROOT/tools/make_fid_fixtures.py" inception "$W/fx" >/dev/null
"$PY" - "$W" <<'PY'
import sys, numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(64):
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/imgs/{i:03d}.png")
PY
echo "== microdit (LibTorch, $(nproc) threads)"
"$B" eval fid --real "$W/imgs" --inception "$W/fx/fid_inception_random.pth" --batch 32 --save-stats "$W/s.npz" | tail -2
echo "== pytorch-fid 0.3.0 (PyTorch $("$PY" -c 'import torch; print(torch.__version__)'))"
"$PY" - "$W" <<'PY'
import sys, time, glob, torch
import pytorch_fid.inception as pfi, torchvision
from pytorch_fid.fid_score import get_activations
pfi.load_state_dict_from_url = lambda *a, **k: None
torchvision.models.inception.Inception3.load_state_dict = lambda self, *a, **k: None
m = pfi.InceptionV3([3]).eval()
files = sorted(glob.glob(sys.argv[1] + "/imgs/*.png"))
get_activations(files[:32], m, batch_size=32, device="cpu", num_workers=0)  # warm-up
t = time.time(); get_activations(files, m, batch_size=32, device="cpu", num_workers=0); dt = time.time() - t
print(f"pytorch-fid: {len(files)} images in {dt:.2f} s = {len(files)/dt:.1f} img/s")
PY
