#!/usr/bin/env python3
"""VAE encode/decode images/s: microdit (C++) against diffusers 0.42.1 in the same run, on the
same random SDXL-config weights (written once as a diffusers folder), fp32 on the CPU.

  mlock .venv/bin/python tools/bench_vae.py [--sizes 256 512] [--batches 1] [--reps 2] [--threads 2]

Both sides: an untimed warm-up on a 64 px input, then the best of --reps timed calls of
encode (posterior only) and decode, each on random inputs of the given size and batch.
Prints one line per measurement and a Markdown table for docs/vae.md.
"""
import argparse
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="/tmp/md_vae_bench")
    ap.add_argument("--bin", default=os.path.join(HERE, "..", "build", "microdit"))
    ap.add_argument("--only", choices=["both", "cpp", "diffusers"], default="both")
    ap.add_argument("--ablation", action="store_true",
                    help="also time microdit with NCHW layout and with diffusers' upsample-then-conv")
    a = ap.parse_args()

    import torch
    from diffusers import AutoencoderKL
    import make_vae_fixtures

    torch.set_num_threads(a.threads)
    if not os.path.exists(os.path.join(a.weights, "diffusion_pytorch_model.safetensors")):
        make_vae_fixtures.make_sdxl(a.weights, seed=0, height=0, width=0)
    vae = AutoencoderKL.from_pretrained(a.weights).eval() if a.only != "cpp" else None

    def best(f):
        b = float("inf")
        for _ in range(a.reps):
            t0 = time.perf_counter()
            f()
            b = min(b, time.perf_counter() - t0)
        return b

    rows = []
    for size in a.sizes:
        for batch in a.batches:
            row = {"size": size, "batch": batch}
            if vae is not None:
                g = torch.Generator().manual_seed(0)
                x = torch.rand((batch, 3, size, size), generator=g) * 2 - 1
                z = torch.randn((batch, 4, size // 8, size // 8), generator=g)
                w = min(size, 64)
                with torch.no_grad():
                    vae.decode(vae.encode(x[:, :, :w, :w]).latent_dist.mean)
                    row["py_enc"] = best(lambda: vae.encode(x).latent_dist)
                    row["py_dec"] = best(lambda: vae.decode(z).sample)
                print(f"diffusers {size} px batch {batch}: encode {row['py_enc']:.3f} s, decode {row['py_dec']:.3f} s",
                      flush=True)
            variants = [[]] + ([["--nchw"], ["--reference-upsample"], ["--nchw", "--reference-upsample"]]
                               if a.ablation else [])
            for extra in variants if a.only != "diffusers" else []:
                out = subprocess.run([a.bin, "vae", "bench", "--vae", a.weights, "--size", str(size), "--batch",
                                      str(batch), "--reps", str(a.reps), "--threads", str(a.threads), "--device",
                                      "cpu"] + extra, check=True, capture_output=True, text=True).stdout
                print(out.strip(), flush=True)
                if not extra:
                    m = re.search(r"encode ([\d.]+) s .* decode ([\d.]+) s", out)
                    row["cpp_enc"], row["cpp_dec"] = float(m.group(1)), float(m.group(2))
            rows.append(row)

    print(f"\n{cpu_name()}, {os.cpu_count()} cores, {a.threads} threads, fp32, torch {torch.__version__}, "
          f"best of {a.reps}")
    print("| size | batch | encode img/s microdit | encode img/s diffusers | decode img/s microdit | "
          "decode img/s diffusers |")
    print("| --- | --- | --- | --- | --- | --- |")
    fmt = lambda r, k: f"{r['batch'] / r[k]:.3f} ({r[k]:.2f} s)" if k in r else "-"
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {fmt(r, 'cpp_enc')} | {fmt(r, 'py_enc')} | {fmt(r, 'cpp_dec')} | "
              f"{fmt(r, 'py_dec')} |")


if __name__ == "__main__":
    main()
