#!/usr/bin/env bash
# Side-by-side CPU timings of microdit and the reference (SonyResearch/micro_diffusion), run
# back to back in one go on an otherwise idle machine (docs/performance.md):
#   training steps: MicroDiT_Nano_2, batch 32, latent 4x32x32, captions 77x1024, mask 0.75,
#                   fp32 and bf16 autocast (microdit bench vs tools/bench_reference.py train)
#   the main job:   its stage-1 shape (Pico at 16x16 px, 21 caption tokens, mask 0.5), bf16 where
#                   the CPU multiplies bf16 (as train.bf16: auto)
#   sampling:       the emoji model's shape (32x32 RGB, patch 4, MiniLM 384-wide captions),
#                   Heun 30 steps, guidance 4 (random weights on both sides)
#   tools/bench_cpu_vs_reference.sh REFERENCE_CHECKOUT [STEPS]
# The reference also runs compiled (torch.compile, as its training configs set misc.compile), with
# tcmalloc: on the CPU, torch 2.11's Inductor fails on its training step (the row says so in one
# line), and compiles its sampler (the DiT's forward).
# microdit's float32 rows also run with each library for the products (--cpu-matmul onednn and
# mkl; the default, auto, takes microdit's own kernels on AVX-512 CPUs), its bf16 rows with
# autocast's casts and oneDNN's products (--cpu-matmul onednn), with ATen's float32
# attention (--cpu-attention aten-float32; the default takes microdit's kernels: bf16 on AMX tiles
# under bf16 autocast on CPUs with AMX, else float32 on AVX-512 CPUs), its bf16 rows also with
# microdit's float32 attention, and all with the fused kernels off, to show what each gives.
# REFERENCE_CHECKOUT: a clone of github.com/SonyResearch/micro_diffusion (development only).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REF=${1:?usage: $0 REFERENCE_CHECKOUT [STEPS]}
STEPS=${2:-10}
BIN="${MICRODIT_BUILD_DIR:-$ROOT/build}/microdit"
PY="$ROOT/.venv/bin/python"
T=$(nproc)
# The reference as a tuned Python user could run it: tcmalloc preloaded (microdit links it).
TCMALLOC=$(ls /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null || true)
echo "# $(lscpu | sed -n 's/^Model name: *//p'), $T threads, $(date -u +%F)"
for prec in fp32 bf16; do
  flag=(); [ "$prec" = bf16 ] && flag=(--bf16)
  runs=("--workers 0" "--workers 1")  # 0: side-by-side workers, one per thread (the default); 1: one stream
  [ "$prec" = fp32 ] && runs+=("--workers 0 --cpu-matmul onednn" "--workers 0 --cpu-matmul mkl")
  [ "$prec" = bf16 ] && runs+=("--workers 0 --cpu-attention float32" "--workers 0 --cpu-matmul onednn")
  runs+=("--workers 0 --cpu-attention aten-float32")
  runs+=("--workers 0 --fused-kernels off")
  for r in "${runs[@]}"; do
    # shellcheck disable=SC2086  # $r is a list of options
    "$BIN" bench --preset MicroDiT_Nano_2 --batch 32 --mask-ratio 0.75 --steps "$STEPS" --warmup 3 \
      --threads "$T" --device cpu $r "${flag[@]}" | tail -n 1
  done
  "$PY" "$ROOT/tools/bench_reference.py" train --reference "$REF" --preset MicroDiT_Nano_2 --batch 32 \
    --mask-ratio 0.75 --steps "$STEPS" --warmup 3 --threads "$T" "${flag[@]}" | tail -n 1
  if [ -n "$TCMALLOC" ]; then
    echo -n "reference with LD_PRELOAD=tcmalloc: "
    LD_PRELOAD="$TCMALLOC" "$PY" "$ROOT/tools/bench_reference.py" train --reference "$REF" --preset MicroDiT_Nano_2 \
      --batch 32 --mask-ratio 0.75 --steps "$STEPS" --warmup 3 --threads "$T" "${flag[@]}" | tail -n 1
  fi
  echo -n "reference compiled${TCMALLOC:+ with LD_PRELOAD=tcmalloc}: "
  LD_PRELOAD="$TCMALLOC" "$PY" "$ROOT/tools/bench_reference.py" train --reference "$REF" --preset MicroDiT_Nano_2 \
    --batch 32 --mask-ratio 0.75 --steps "$STEPS" --warmup 3 --threads "$T" --compile "${flag[@]}" 2>&1 |
    grep -E "^(reference bench|compile:|bench_reference:)" | tr '\n' ' ' || true
  echo
done
# Training at the main job's stage-1 shape (configs/emoji_cpu_16px.yaml: Pico, 16x16 RGB in 4x4
# patches, 21 MiniLM caption tokens of 384, mask 0.5, 32 images a step), bf16 autocast where the
# CPU multiplies bf16 as the main job trains (train.bf16: auto), float32 elsewhere.
main=(--preset MicroDiT_Pico_2 --latent-size 16 --in-channels 3 --patch-size 4 --caption-channels 384 --caption-len 21
  --mask-ratio 0.5 --batch 32 --steps $((STEPS * 10)) --warmup 10 --threads "$T")
mflag=(); grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo && mflag=(--bf16)
for r in "" "--cpu-matmul onednn"; do
  # shellcheck disable=SC2086  # $r is a list of options
  "$BIN" bench "${main[@]}" --device cpu $r "${mflag[@]}" | tail -n 1
done
echo -n "reference${TCMALLOC:+ with LD_PRELOAD=tcmalloc}: "
LD_PRELOAD="$TCMALLOC" "$PY" "$ROOT/tools/bench_reference.py" train --reference "$REF" "${main[@]}" "${mflag[@]}" | tail -n 1
# Sampling: the emoji model's shape, 32 images, 16 per batch, Heun 30 steps, guidance 4, random
# weights on both sides; both rates are of the sampler loop only.
for prec in fp32 bf16; do
  flag=(); [ "$prec" = bf16 ] && flag=(--bf16)
  runs=("--fused-kernels on" "--fused-kernels off" "--cpu-attention aten-float32")
  [ "$prec" = bf16 ] && runs+=("--cpu-attention float32" "--cpu-matmul onednn")
  for r in "${runs[@]}"; do
    # shellcheck disable=SC2086  # $r is a list of options
    "$BIN" bench --sample --preset MicroDiT_Pico_2 --latent-size 32 --in-channels 3 --patch-size 4 \
      --caption-channels 384 --caption-len 21 --n 32 --batch 16 --sampler-steps 30 --cfg 4 --threads "$T" \
      --device cpu $r "${flag[@]}" | tail -n 1
  done
  ref_sample=("$ROOT/tools/bench_reference.py" sample --reference "$REF" --preset MicroDiT_Pico_2 --latent-size 32
    --in-channels 3 --patch-size 4 --caption-channels 384 --caption-len 21 --n 32 --batch 16 --steps 30 --cfg 4
    --threads "$T" "${flag[@]}")
  "$PY" "${ref_sample[@]}" | tail -n 1
  if [ -n "$TCMALLOC" ]; then
    echo -n "reference with LD_PRELOAD=tcmalloc: "
    LD_PRELOAD="$TCMALLOC" "$PY" "${ref_sample[@]}" | tail -n 1
  fi
  echo -n "reference compiled${TCMALLOC:+ with LD_PRELOAD=tcmalloc}: "
  LD_PRELOAD="$TCMALLOC" "$PY" "${ref_sample[@]}" --compile 2>&1 |
    grep -E "^(reference sample|compile:|bench_reference:)" | tr '\n' ' ' || true
  echo
done
