#!/usr/bin/env bash
# Packs what a lent GPU machine (the `device` tool) needs to run this build, into
# .gpu/carry.tar.xz (git ignores .gpu/): stripped microdit and microdit_tests, the Debian
# shared libraries they link (not glibc's, not LibTorch's or CUDA's: the machine's own torch
# provides those), and the reference checkout for the side-by-side timings. The binaries and
# libraries are about 110 MB unpacked, over the tool's 64 MiB for carried files; xz brings them
# under it.
#   tools/gpu_carry.sh REFERENCE_CHECKOUT
# Then, as one device call (carry [".gpu"]; tools/gpu_run.sh unpacks and runs):
#   bash tools/gpu_run.sh 1      # tests, parity, b256 training rows, memory, both programs' profiles
#                                # by kind of work (~8 min on an H200)
#   bash tools/gpu_run.sh 2,3    # unmasked rows, the compiled reference unmasked (~6 min),
#                                # right after, while the machine is still warm (it idles out in 30 s)
#   bash tools/gpu_run.sh 4      # sampling (~1.5 min), if device time is left
# Session 16 (900 s of device time): call 1 took 462 s, "2,3" had 370 s left and needed a little more.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REF=${1:?usage: $0 REFERENCE_CHECKOUT}
B="${MICRODIT_BUILD_DIR:-$ROOT/build}"
[ -d "$REF/micro_diffusion" ] || { echo "error: $REF is no micro_diffusion checkout" >&2; exit 1; }
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/lib" "$STAGE/ref"
for b in microdit microdit_tests; do
  [ -x "$B/$b" ] || { echo "error: $B/$b is not built" >&2; exit 1; }
  strip -o "$STAGE/bin/$b" "$B/$b"
done
# Every library ldd resolves outside the torch wheel, less the C library's own.
ldd "$B/microdit" "$B/microdit_tests" | awk '/=> \// {print $3}' | sort -u | while read -r lib; do
  case "$(basename "$lib")" in
    libc.so.*|libm.so.*|libdl.so.*|librt.so.*|libpthread.so.*|libutil.so.*|ld-linux*) continue ;;
  esac
  case "$lib" in */site-packages/*) continue ;; esac
  cp -L "$lib" "$STAGE/lib/"
done
cp -r "$REF/micro_diffusion" "$STAGE/ref/"
# The parity vectors beside the checkout (../shared/reference): the device tool carries only
# the checkout itself.
mkdir -p "$STAGE/vectors"
cp "$ROOT"/../shared/reference/*.safetensors "$STAGE/vectors/" 2>/dev/null || true
mkdir -p "$ROOT/.gpu"
tar -C "$STAGE" -cf - bin lib ref vectors | xz -T2 -6 > "$ROOT/.gpu/carry.tar.xz.tmp"
mv "$ROOT/.gpu/carry.tar.xz.tmp" "$ROOT/.gpu/carry.tar.xz"
size=$(stat -c %s "$ROOT/.gpu/carry.tar.xz")
echo ".gpu/carry.tar.xz: $((size / 1024 / 1024)) MiB ($(ls "$STAGE/lib" | wc -l) libraries)"
[ "$size" -lt $((60 * 1024 * 1024)) ] || { echo "error: over the device tool's 64 MiB for carried files" >&2; exit 1; }
