#!/usr/bin/env bash
# End to end on the paper's data path, small (issue #8 item 6): emoji images + captions ->
# `prepare` with a random-weight VAE of the SDXL architecture at full width and MiniLM ->
# the reference's latent MDS -> a tiny latent MicroDiT trained a few steps with the paper's
# stage-1 settings scaled down (patch 2, 75 % deferred masking, caption dropout 0.1) ->
# `sample --vae` -> PNGs of the right size. It proves the plumbing; real weights come from
# the user (docs/paper.md). About a minute on 2 cores.
#   e2e_latent.sh BIN SOURCE_DIR WORK_DIR
set -euo pipefail
BIN=$1 SRC=$2 WORK=$3
for f in /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf /usr/share/unicode/emoji/emoji-test.txt; do
  [ -f "$f" ] || { echo "SKIPPED: $f missing"; exit 0; }
done
"$BIN" encode-text --encoder minilm --text probe >/dev/null 2>&1 || { echo "SKIPPED: MiniLM assets missing"; exit 0; }
rm -rf "$WORK" && mkdir -p "$WORK/images"
step() { printf '\n== %s\n' "$*"; }

step "24 emoji at 128 px as an image folder with same-name .txt captions"
"$BIN" dataset emoji --out "$WORK/emoji" --size 128 >/dev/null
n=0
while IFS= read -r line && [ $n -lt 24 ]; do
  file=$(printf '%s' "$line" | sed -n 's/.*"file": *"\([^"]*\)".*/\1/p')
  cap=$(printf '%s' "$line" | sed -n 's/.*"caption": *"\([^"]*\)".*/\1/p')
  [ -n "$file" ] && [ -n "$cap" ] || continue
  base=$(printf 'e%03d' $n)
  cp "$WORK/emoji/$file" "$WORK/images/$base.png"
  printf '%s\n' "$cap" > "$WORK/images/$base.txt"
  n=$((n + 1))
done < "$WORK/emoji/captions.jsonl"
[ $n -eq 24 ] || { echo "FAIL: only $n images"; exit 1; }

step "random SDXL-architecture VAE (83.65 M parameters)"
"$BIN" vae init --out "$WORK/vae.safetensors" --seed 0

step "prepare: images -> latent MDS (latents_128, MiniLM caption_latents)"
"$BIN" prepare --images "$WORK/images" --vae "$WORK/vae.safetensors" --encoder minilm \
  --sizes 128 --out "$WORK/mds"
[ -f "$WORK/mds/index.json" ] || { echo "FAIL: no index.json"; exit 1; }
grep -q '"latents_128"' "$WORK/mds/index.json" || { echo "FAIL: no latents_128 column"; exit 1; }

step "train a tiny latent model (stage-1 settings, scaled down)"
cat > "$WORK/train.yaml" <<YAML
model: {preset: MicroDiT_Pico_2, input_size: 16, in_channels: 4, caption_channels: 384, depth: 2}
edm: {sigma_data: 0.9, P_mean: -0.6, P_std: 1.2}
data: {shards: [$WORK/mds], image_size: 128, caption_dropout: 0.1}
train: {steps: 20, batch_size: 8, mask_ratio: 0.75, lr: 2.4e-4, warmup_steps: 2, grad_clip: 0.25, seed: 18}
run: {out: $WORK/run, log_every: 5, checkpoint_every: 20, val_every: 0, vae: $WORK/vae.safetensors}
YAML
"$BIN" train --config "$WORK/train.yaml"
ckpt=$("$BIN" train --config "$WORK/train.yaml" --print-final-checkpoint)
[ -f "$ckpt" ] || { echo "FAIL: no checkpoint $ckpt"; exit 1; }

step "sampling a latent model without a VAE is a clear error"
if "$BIN" sample --ckpt "$ckpt" --prompt "red heart" --n 1 --steps 2 --out "$WORK/x.png" 2> "$WORK/err.txt"; then
  echo "FAIL: sampling without --vae succeeded"; exit 1
fi
grep -q -- "--vae" "$WORK/err.txt" || { echo "FAIL: the error does not name --vae:"; cat "$WORK/err.txt"; exit 1; }

step "sample --vae -> PNG"
"$BIN" sample --ckpt "$ckpt" --vae "$WORK/vae.safetensors" --prompt "red heart" --n 2 --steps 4 \
  --out "$WORK/samples.png"
# PNG width/height: big-endian uint32 at bytes 16 and 20. Two 128-px cells with 2-px margins.
w=$(od -An -tu1 -j16 -N4 "$WORK/samples.png" | awk '{print $1*16777216+$2*65536+$3*256+$4}')
h=$(od -An -tu1 -j20 -N4 "$WORK/samples.png" | awk '{print $1*16777216+$2*65536+$3*256+$4}')
echo "samples.png: ${w}x${h}"
[ "$w" -eq $((2 * 128 + 3 * 2)) ] && [ "$h" -eq $((128 + 2 * 2)) ] || { echo "FAIL: unexpected size"; exit 1; }
echo "PASS"
