#!/usr/bin/env bash
# CLIP-score throughput: microdit eval clip-score vs open_clip on the same 32 PNGs (256x256) and
# captions, random weights of open_clip's ViT-B-16 (a ViT-H-14 file is 4 GB; the code path is the
# same), batch 16, same machine, same run. Both include decoding, preprocessing and the text tower.
# Usage: tools/bench_clip_score.sh BUILD_DIR WORK_DIR   (run under mlock on the shared machine)
set -euo pipefail
B="$1/microdit"; W="$2"; ROOT="$(cd "$(dirname "$0")/.." && pwd)"; PY="$ROOT/.venv/bin/python"
MODEL="${MODEL:-ViT-B-16}"
mkdir -p "$W/imgs"
"$PY" - "$W" "$MODEL" <<'PY'
import os, sys, numpy as np, torch, open_clip
from PIL import Image
from safetensors.torch import save_file
w, name = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
with open(f"{w}/caps.txt", "w") as f:
    for i in range(32):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(f"{w}/imgs/{i:03d}.png")
        f.write(f"a photo number {i} of a red heart\n")
if not os.path.exists(f"{w}/{name}.safetensors"):
    torch.manual_seed(0)
    m = open_clip.create_model(name, pretrained=None)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, f"{w}/{name}.safetensors")
PY
echo "== microdit (LibTorch, $(nproc) threads), $MODEL"
"$B" eval clip-score --images "$W/imgs" --captions "$W/caps.txt" --clip "$W/$MODEL.safetensors" --batch 16
echo "== open_clip $("$PY" -c 'import open_clip; print(open_clip.__version__)')"
"$PY" - "$W" "$MODEL" <<'PY'
import sys, time, glob, torch, open_clip
from PIL import Image
from safetensors.torch import load_file
w, name = sys.argv[1], sys.argv[2]
m, _, pre = open_clip.create_model_and_transforms(name, pretrained=None)
m.load_state_dict(load_file(f"{w}/{name}.safetensors")); m.eval()
tok = open_clip.get_tokenizer(name)
files = sorted(glob.glob(w + "/imgs/*.png")); caps = open(w + "/caps.txt").read().splitlines()
def run():
    s = []
    with torch.no_grad():
        for i in range(0, len(files), 16):
            x = torch.stack([pre(Image.open(f).convert("RGB")) for f in files[i:i+16]])
            fi = m.encode_image(x, normalize=True); ft = m.encode_text(tok(caps[i:i+16]), normalize=True)
            s.append(100 * (fi * ft).sum(-1))
    return torch.cat(s).mean().clamp(min=0).item()
t = time.time(); sc = run(); dt = time.time() - t
print(f"open_clip: CLIP score {sc:.4f}; {len(files)} images in {dt:.2f} s = {len(files)/dt:.1f} img/s")
PY
