#!/usr/bin/env bash
# The main job on the embedded default, from nothing: set-up, the emoji dataset, shards with
# MiniLM caption embeddings, training MicroDiT on the CPU in two stages (16 x 16:
# configs/emoji_cpu_16px.yaml, then 32 x 32: configs/emoji_cpu.yaml), a sample grid, the
# colour-conditioning check and the recall measure. Every stage is skipped when its output exists, and
# an interrupted training resumes from its last checkpoint.
# A finished stage trained under other settings (an edited config, a newer default) is moved
# aside and trained again, and so is a stage 2 trained from an older stage 1.
#   MICRODIT_STEPS=N   train stage 1 for N steps and stage 2 for 5N/16 instead of the configs' (quick
#                      looks), in runs/emoji-16px-stepsN and runs/emoji-stepsN
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
BIN="${MICRODIT_BUILD_DIR:-$ROOT/build}/microdit"
CONFIG16=configs/emoji_cpu_16px.yaml RUN16=runs/emoji-16px   # stage 1: 16 x 16
CONFIG=configs/emoji_cpu.yaml RUN=runs/emoji                  # stage 2: 32 x 32, from stage 1
EXTRA16=() EXTRA=()
if [ -n "${MICRODIT_STEPS:-}" ]; then  # stage 1 gets N steps, stage 2 N * 5/16 (as 8000 and 2500)
  s2=$(( MICRODIT_STEPS * 5 / 16 > 1 ? MICRODIT_STEPS * 5 / 16 : 1 ))
  EXTRA16+=("train.steps=$MICRODIT_STEPS" "train.unmasked_steps=$((MICRODIT_STEPS / 12))")
  EXTRA+=("train.steps=$s2" "train.unmasked_steps=$((s2 / 8))")
  RUN16="$RUN16-steps$MICRODIT_STEPS" RUN="$RUN-steps$MICRODIT_STEPS"  # the full runs stay as they are
  EXTRA16+=("run.out=$RUN16") EXTRA+=("run.out=$RUN")
fi
say() { printf '\n== %s\n' "$*"; }
start=$(date +%s)

say "1/6 dataset: every fully-qualified emoji at 32x32, skin-tone variants left out (data/emoji)"
# Version 2 captions carry the colour word, and the default set has each emoji once (no
# skin-tone variants: docs/training.md); an older render is redone, and so are its shards.
if [ -f data/emoji/dataset.json ] && grep -q '"version": 2' data/emoji/dataset.json \
   && grep -q '"skin_tones": "none"' data/emoji/dataset.json; then
  echo "exists, skipped"
else
  [ -d data/emoji ] && echo "data/emoji is from an older version: rendering again"
  rm -rf data/emoji data/emoji-shards
  "$BIN" dataset emoji --out data/emoji --size 32 --skin-tones none
fi

say "2/6 shards: pixels + all-MiniLM-L6-v2 caption embeddings (data/emoji-shards)"
if [ -f data/emoji-shards/index.json ] && [ data/emoji-shards/index.json -nt data/emoji/captions.jsonl ]; then
  echo "exists, skipped"
else
  rm -rf data/emoji-shards
  "$BIN" prepare --dataset data/emoji --out data/emoji-shards
  for r in "$RUN16" "$RUN"; do  # trained on other shards: keep it, out of the way
    if [ -d "$r" ]; then old="$r-previous-$(date +%Y%m%d-%H%M%S)"; mv "$r" "$old"; echo "moved the older run to $old"; fi
  done
fi

# One process per stage; on the CPU it runs each batch as slices side by side on
# single-threaded workers (train.cpu_workers, one per core by default): this small model's
# kernels do not scale across intra-op threads, whole slices do (1.4x on 2 cores; docs/training.md).
# A run interrupted in either stage resumes from its last checkpoint.
move_aside() {  # RUN_DIR WHY
  local old; old="$1-previous-$(date +%Y%m%d-%H%M%S)"; mv "$1" "$old"; echo "$1 $2: moved to $old"
}
train_stage() {  # RUN_DIR FINAL_CHECKPOINT CONFIG OVERRIDES...: trains, or resumes, unless FINAL_CHECKPOINT exists
  local run=$1 final_ckpt=$2 cfg=$3 changed; shift 3
  changed=$("$BIN" train --config "$cfg" "$@" --print-changed-settings)
  if [ -n "$changed" ]; then move_aside "$run" "was trained under other settings ($changed)"; fi
  if [ -f "$final_ckpt" ]; then echo "finished run found ($final_ckpt), skipped"; else
    "$BIN" train --config "$cfg" "$@" --resume; fi
}
say "3/6 training, stage 1 of 2: 16 x 16 ($CONFIG16 -> $RUN16)"
if [ ! -d "$RUN16" ] && [ -d "$RUN" ]; then  # a one-stage run of an older default: keep it, out of the way
  move_aside "$RUN" "is a one-stage run of an older default"
fi
final16=$("$BIN" train --config "$CONFIG16" "${EXTRA16[@]}" --print-final-checkpoint)
train_stage "$RUN16" "$final16" "$CONFIG16" "${EXTRA16[@]}"
say "3/6 training, stage 2 of 2: 32 x 32 from stage 1 ($CONFIG -> $RUN)"
latest2=$(ls "$RUN"/checkpoints/step-*.safetensors 2>/dev/null | tail -n 1 || true)
if [ -n "$latest2" ] && [ "$final16" -nt "$latest2" ]; then move_aside "$RUN" "started from an older stage 1"; fi
S2=("${EXTRA[@]}" "stage.init_from=$final16")
final=$("$BIN" train --config "$CONFIG" "${S2[@]}" --print-final-checkpoint)
train_stage "$RUN" "$final" "$CONFIG" "${S2[@]}"

say "4/6 samples from text (EMA weights, Heun 30 steps, guidance 4)"
"$BIN" sample --ckpt "$final" --n 6 --steps 30 --cfg 4 --seed 0 --out "$RUN/samples.png" \
  --prompt "red heart, smileys & emotion, heart, mostly red" \
  --prompt "blue heart, smileys & emotion, heart, mostly blue" \
  --prompt "grinning face, smileys & emotion, face smiling, mostly yellow" \
  --prompt "frog, animals & nature, animal amphibian, mostly green" \
  --prompt "red apple, food & drink, food fruit, mostly red" \
  --prompt "sun, travel & places, sky & weather, mostly yellow" \
  --prompt "flag: Japan, flags, country flag, mostly red" \
  --prompt "rocket, travel & places, transport air, mostly red"

say "5/6 does the text steer the picture? (colour check on hearts + validation loss)"
check=0
"$BIN" eval-colour --ckpt "$final" --metrics "$RUN/metrics.jsonl" --out "$RUN/colour-check.png" \
  --summary "$RUN/summary.json" || check=$?

say "6/6 does it draw the emoji it is asked for? (nearest training image of a sample per caption)"
"$BIN" eval-recall --ckpt "$final" --dataset data/emoji --out "$RUN/recall.png" --summary "$RUN/summary.json" \
  || check=$?

say "done in $(( ($(date +%s) - start) / 60 )) min. Pictures:"
echo "  $RUN/samples.png        samples for 8 prompts (prompts in $RUN/samples.png.txt)"
echo "  $RUN/colour-check.png   the colour check's samples, one row per colour"
echo "  $RUN/recall.png         per caption: the emoji, the sample, the nearest training image"
echo "  $RUN/loss.png           training and validation loss"
echo "  $RUN/samples/           the fixed prompts during training"
if [ "$check" -ne 0 ]; then echo "colour check: FAILED (see above and docs/training.md)"; else echo "colour check: passed"; fi
say "look at them, watch the run and generate from your own prompts in a browser (docs/serve.md):"
echo "  $BIN serve --ckpt $final --runs runs      # then open http://127.0.0.1:8188/"
exit "$check"
