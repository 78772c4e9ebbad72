#!/usr/bin/env python3
"""Time the *reference* MicroDiT (SonyResearch/micro_diffusion) next to `microdit bench` / `sample`.

Development tool for docs/performance figures. It builds the reference DiT
(micro_diffusion/models/dit.py) with the sizes of a microdit preset and runs the
reference's own EDM code (LatentDiffusion.edm_loss / edm_sampler_loop, called on a
minimal stand-in `self` exactly as tools/make_parity_vectors.py does); the reference's
heavy imports that the network does not use are replaced by that tool's stand-ins.
Needs a checkout of the reference (the folder holding micro_diffusion/models/) and the
project venv (torch, numpy, safetensors).

Modes
  train   one step = zero_grad, the reference's masked EDM loss (random latents and
          captions), backward, AdamW(lr 1e-4, betas 0.9/0.999, eps 1e-8, wd 0.1) step,
          the same step as `microdit bench`. Prints ms/step, images/s, peak memory.
  sample  the reference's Heun EDM sampler loop with classifier-free guidance on a
          randomly initialised (reference-initialised) model; random captions, latents
          drawn like LatentDiffusion.generate, no VAE decode (return_only_latents).
          Prints images/s.

Examples (from the repository root; REF is a reference work tree, e.g.
  git -C /work/.mirror/SonyResearch+micro_diffusion/repo archive HEAD | tar -x -C /tmp/ref):
  .venv/bin/python tools/bench_reference.py train --reference /tmp/ref \\
      --preset MicroDiT_Pico_2 --latent-size 32 --batch 8 --steps 10 --warmup 3 --threads 2
  .venv/bin/python tools/bench_reference.py train --reference /tmp/ref --device cuda \\
      --preset MicroDiT_XL_2 --batch 256 --bf16 --compile --fused-adamw --json xl.json
  .venv/bin/python tools/bench_reference.py sample --reference /tmp/ref \\
      --preset MicroDiT_Pico_2 --latent-size 32 --in-channels 3 --patch-size 4 \\
      --caption-channels 384 --caption-len 77 --n 16 --batch 16 --steps 30 --cfg 4
  (tiny check: train --preset MicroDiT_Pico_2 --latent-size 8 --batch 2 --steps 2 --warmup 1)

Where this deviates from how the reference trains (configs/res_*_pretrain.yaml with
Composer): one device, no FSDP; no gradient clipping unless --clip-norm 0.25; LayerNorm
runs in fp32 under bf16 autocast unless --low-precision-layernorm (Composer's
low_precision_layernorm algorithm, reimplemented here in a few lines); no data loader,
EMA, LR schedule or callbacks; --compile compiles the loss function (DiT + EDM, as
Composer compiles the whole model's forward), with the default torch.compile settings.
"""
import argparse
import functools
import json
import os
import resource
import sys
import time
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_parity_vectors import install_stand_ins  # noqa: E402

# microdit's presets (src/model/config.cpp presets()); the rest as the reference's
# MicroDiT_XL_2 factory: patch 2, 4 channels, 1024 caption channels, qkv 0.5..1,
# mlp 0.5..4, mixer qkv 1 / mlp 4, no bias, capacity 2, experts every 2nd block.
PRESETS = {
    "MicroDiT_XL_2": dict(dim=1024, depth=28, head_dim=64, patch_mixer_depth=6,
                          patch_mixer_dim=768, multiple_of=256, num_experts=8),
    "MicroDiT_Tiny_2": dict(dim=512, depth=16, head_dim=32, patch_mixer_depth=4,
                            patch_mixer_dim=512, multiple_of=256, num_experts=8),
    "MicroDiT_Nano_2": dict(dim=256, depth=8, head_dim=32, patch_mixer_depth=2,
                            patch_mixer_dim=256, multiple_of=64, num_experts=8),
    "MicroDiT_Pico_2": dict(dim=128, depth=6, head_dim=32, patch_mixer_depth=2,
                            patch_mixer_dim=128, multiple_of=32, num_experts=4),
}
COMMON = dict(patch_size=2, in_channels=4, caption_channels=1024, qkv_ratio=(0.5, 1.0),
              mlp_ratio=(0.5, 4.0), expert_capacity=2.0, experts_every_n=2, use_bias=False,
              pos_interp_scale=1.0)


def die(msg):
    sys.exit(f"bench_reference: {msg}")


def compile_failed(args, e):
    """With --compile, a failure inside torch.compile ends the run with one line (on the CPU,
    torch 2.11's Inductor fails to compile its own C++ for the reference's training step)."""
    if not args.compile:
        raise e
    first = (str(e).strip().splitlines() or [""])[0][:200]
    die(f"torch.compile failed in the first {'step' if args.mode == 'train' else 'sampler call'}: "
        f"{type(e).__name__}: {first}")


def build_dit(ref_dit, args):
    """The reference DiT with the preset's sizes (its own constructor and init)."""
    c = dict(COMMON, **PRESETS[args.preset])
    for k in ("patch_size", "in_channels", "caption_channels"):
        if getattr(args, k) is not None:
            c[k] = getattr(args, k)
    if args.latent_size % c["patch_size"]:
        die(f"--latent-size {args.latent_size} is not a multiple of the patch size {c['patch_size']}")
    d = c["depth"]
    model = ref_dit.DiT(
        input_size=args.latent_size, patch_size=c["patch_size"], in_channels=c["in_channels"],
        dim=c["dim"], depth=d, head_dim=c["head_dim"], multiple_of=c["multiple_of"],
        caption_channels=c["caption_channels"], pos_interp_scale=c["pos_interp_scale"],
        norm_eps=1e-6, depth_init=True,
        qkv_multipliers=np.linspace(*c["qkv_ratio"], num=d, dtype=float),
        ffn_multipliers=np.linspace(*c["mlp_ratio"], num=d, dtype=float),
        use_patch_mixer=True, patch_mixer_depth=c["patch_mixer_depth"],
        patch_mixer_dim=c["patch_mixer_dim"], patch_mixer_qkv_ratio=1.0,
        patch_mixer_mlp_ratio=4.0, use_bias=c["use_bias"], num_experts=c["num_experts"],
        expert_capacity=c["expert_capacity"], experts_every_n=c["experts_every_n"])
    return model, c


def low_precision_layernorm(model):
    """LayerNorm in the autocast dtype (what Composer's low_precision_layernorm does)."""
    def forward(self, x):
        if not torch.is_autocast_enabled(x.device.type):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        dt = torch.get_autocast_dtype(x.device.type)
        cast = lambda t: None if t is None else t.to(dt)  # noqa: E731
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(cast(x), self.normalized_shape, cast(self.weight),
                                cast(self.bias), self.eps)
    n = 0
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.forward = types.MethodType(forward, m)
            n += 1
    return n


def edm_self(EasyDict, ref_model, dit):
    """A minimal `self` for the reference's LatentDiffusion EDM methods (its own defaults)."""
    edm = types.SimpleNamespace(
        edm_config=EasyDict(sigma_min=0.002, sigma_max=80, P_mean=-0.6, P_std=1.2, sigma_data=0.9,
                            num_steps=18, rho=7, S_churn=0, S_min=0, S_max=float("inf"),
                            S_noise=1),
        dit=dit, randn_like=torch.randn_like)
    edm.model_forward_wrapper = functools.partial(ref_model.LatentDiffusion.model_forward_wrapper,
                                                  edm)
    return edm


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def autocast(device, on):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)


def profile_runs(args, device, fn, what):
    """After timing: args.profile more calls of fn under torch.profiler. Prints the names with
    the most time (on CUDA each kernel's device time, on the CPU each operator's self time)
    and writes every name to --profile-json in `microdit bench --profile-json`'s format, for
    tools/compare_profiles.py."""
    import warnings
    from torch.profiler import ProfilerActivity, profile
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # no "no GPU" error line on the CPU
    warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(args.profile):
            fn()
        sync(device)
        wall_ms = 1e3 * (time.perf_counter() - t0)
    sums, threads = {}, set()  # name -> [ms, count]; the threads with operators
    if cuda:  # kernels, copies and memsets on the device, as microdit's profile_ops counts them
        for e in prof.profiler.kineto_results.events():
            if e.device_type() == torch.autograd.DeviceType.CUDA:
                s = sums.setdefault(e.name(), [0.0, 0])
                s[0] += e.duration_ns() / 1e6
                s[1] += 1
    else:
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CPU:
                threads.add(e.thread)
                # The optimizer's elementwise operators (aten::mul, lerp_, ...) under its name, as
                # "Optimizer.step#AdamW.step > aten::mul", so that they count as the optimizer's.
                root = e
                while root.cpu_parent is not None:
                    root = root.cpu_parent
                name = f"{root.key} > {e.key}" if root is not e and root.key.startswith("Optimizer.") else e.key
                s = sums.setdefault(name, [0.0, 0])
                s[0] += max(e.self_cpu_time_total, 0) / 1e3
                s[1] += 1
    rows = sorted(sums.items(), key=lambda kv: -kv[1][0])
    busy = sum(ms for ms, _ in sums.values())
    unit = "device activity" if cuda else "CPU operator (self time)"
    print(f"{'GPU activity' if cuda else 'CPU operators'} over {args.profile} more {what}:")
    print(f"{'ms':>9} {'share':>6} {'count':>7} {'mean us':>9}  {unit}")
    for name, (ms, n) in rows[:args.profile_rows]:
        print(f"{ms:9.2f} {100 * ms / max(busy, 1e-9):5.1f}% {n:7d} {1e3 * ms / n:9.1f}  {name[:170]}")
    print(f"{'device busy' if cuda else 'operators'} {busy:.1f} ms in {wall_ms:.1f} ms wall, "
          f"{sum(n for _, n in sums.values())} {'device activities' if cuda else 'calls'}, {len(sums)} distinct")
    if args.profile_json:
        if cuda:
            threads = {e.start_thread_id() for e in prof.profiler.kineto_results.events()
                       if e.device_type() == torch.autograd.DeviceType.CPU}
        out = dict(program="reference", device=device.type, unit=unit, runs=args.profile, threads=len(threads),
                   wall_ms=wall_ms,
                   busy_ms=busy, by_name=[dict(name=k, count=n, ms=ms) for k, (ms, n) in rows], by_site=[])
        tmp = f"{args.profile_json}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.profile_json)


def profile_or_warn(*a):
    """profile_runs, whose failure costs one line, not the figures printed before it."""
    try:
        profile_runs(*a)
    except Exception as e:  # noqa: BLE001
        print(f"bench_reference: --profile failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)


def run_train(args, device, ref, EasyDict):
    ref_dit, ref_model = ref
    model, c = build_dit(ref_dit, args)
    model.to(device).train()
    if args.low_precision_layernorm:
        low_precision_layernorm(model)
    opt_kw = {}
    if args.fused_adamw:
        opt_kw["fused"] = True
    if args.foreach_adamw:
        opt_kw["foreach"] = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.1, **opt_kw)
    B, C, S = args.batch, c["in_channels"], args.latent_size
    x = torch.randn(B, C, S, S, device=device)
    y = torch.randn(B, 1, args.caption_len, c["caption_channels"], device=device)
    edm = edm_self(EasyDict, ref_model, model)

    # The reference's own loss code, in place (no reimplementation).
    def loss_fn(x, y):
        return ref_model.LatentDiffusion.edm_loss(edm, x, y, mask_ratio=args.mask_ratio)
    if args.compile:
        loss_fn = torch.compile(loss_fn, backend=args.compile_backend)

    def step():
        opt.zero_grad()
        with autocast(device, args.bf16):
            loss = loss_fn(x, y)
        loss.backward()
        if args.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        opt.step()
        return loss

    first_s = None
    t0 = time.perf_counter()
    try:
        for i in range(args.warmup):
            step()
            if i == 0:
                sync(device)
                first_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 (one line, not a traceback)
        compile_failed(args, e)
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(device)
    s = time.perf_counter() - t0
    if not torch.isfinite(loss.detach()).item():
        die(f"the loss is not finite ({loss.item()})")
    ms, ips = 1e3 * s / args.steps, B * args.steps / s
    mem, mem_kind = peak_memory_mib(device)
    prec = "bf16 autocast" if args.bf16 else "fp32"
    print(f"reference bench {args.preset} latent {S} batch {B} mask {args.mask_ratio:g} {prec}"
          f"{' compiled' if args.compile else ''}: {ms:.1f} ms/step, {ips:.1f} images/s, "
          f"peak {mem:.0f} MiB ({mem_kind})")
    if args.compile:
        print(f"compile: first warm-up step {first_s:.1f} s (compile + one step), "
              f"all {args.warmup} warm-up steps {warm_s:.1f} s")
    if args.profile:
        profile_or_warn(args, device, step, "steps")
    return dict(ms_per_step=ms, images_per_s=ips, peak_mib=mem, peak_kind=mem_kind,
                first_step_s=first_s, warmup_s=warm_s, timed_s=s,
                params=sum(p.numel() for p in model.parameters()), model=c)


def run_sample(args, device, ref, EasyDict):
    ref_dit, ref_model = ref
    model, c = build_dit(ref_dit, args)
    model.to(device).eval()
    if args.low_precision_layernorm:
        low_precision_layernorm(model)
    dit = torch.compile(model, backend=args.compile_backend) if args.compile else model
    edm = edm_self(EasyDict, ref_model, dit)
    C, S, L, Cc = c["in_channels"], args.latent_size, args.caption_len, c["caption_channels"]
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def sample(n, steps):  # as LatentDiffusion.generate(return_only_latents=True), minus text
        y = torch.randn(n, 1, L, Cc, device=device, generator=gen)
        z = torch.randn(n, C, S, S, device=device, generator=gen)
        with autocast(device, args.bf16):
            return ref_model.LatentDiffusion.edm_sampler_loop(edm, z, y, steps, cfg=args.cfg)

    t0 = time.perf_counter()
    try:
        for _ in range(args.warmup):
            sample(min(args.batch, args.n), 2)
    except Exception as e:  # noqa: BLE001 (one line, not a traceback)
        compile_failed(args, e)
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for start in range(0, args.n, args.batch):
        out = sample(min(args.batch, args.n - start), args.steps)
    sync(device)
    s = time.perf_counter() - t0
    if not torch.isfinite(out).all().item():
        die("the sampler gave non-finite latents")
    nfe = 2 * args.steps - 1  # Heun: the last step is Euler only
    batches = -(-args.n // args.batch)
    ips = args.n / s
    mem, mem_kind = peak_memory_mib(device)
    prec = "bf16 autocast" if args.bf16 else "fp32"
    print(f"reference sample {args.preset} latent {S} ({C} ch, patch {c['patch_size']}) n {args.n} "
          f"batch {args.batch} steps {args.steps} heun cfg {args.cfg:g} {prec}"
          f"{' compiled' if args.compile else ''}: {s:.2f} s, {ips:.2f} images/s, "
          f"{1e3 * s / (nfe * batches):.1f} ms per network call, peak {mem:.0f} MiB ({mem_kind})")
    if args.compile:
        print(f"compile: {args.warmup} warm-up call(s) of a 2-step sampler {warm_s:.1f} s (compile included)")
    if args.profile:
        # One profiled run samples all --n images, as one of `microdit bench --sample --profile`.
        profile_or_warn(args, device, lambda: [sample(min(args.batch, args.n - i), args.steps)
                                            for i in range(0, args.n, args.batch)], "sampling runs")
    return dict(seconds=s, images_per_s=ips, ms_per_call=1e3 * s / (nfe * batches),
                network_calls=nfe * batches, warmup_s=warm_s, peak_mib=mem, peak_kind=mem_kind,
                params=sum(p.numel() for p in model.parameters()), model=c)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("mode", choices=["train", "sample"])
    ap.add_argument("--reference", required=True, help="folder holding micro_diffusion/models/")
    ap.add_argument("--preset", default="MicroDiT_Pico_2", choices=sorted(PRESETS))
    ap.add_argument("--latent-size", type=int, default=32, help="latent H = W")
    ap.add_argument("--in-channels", type=int, help="default: 4")
    ap.add_argument("--patch-size", type=int, help="default: 2")
    ap.add_argument("--caption-channels", type=int, help="default: 1024")
    ap.add_argument("--caption-len", type=int, default=77)
    ap.add_argument("--batch", type=int, default=None,
                    help="images per step / per sampler batch (default 8 / 16)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed training steps (default 10) / sampler steps (default 30)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (train, default 3) / untimed 2-step sampler "
                         "runs first (sample, default 1)")
    ap.add_argument("--mask-ratio", type=float, default=0.75, help="train: masking ratio")
    ap.add_argument("--n", type=int, default=16, help="sample: images in all")
    ap.add_argument("--cfg", type=float, default=4.0, help="sample: guidance scale (1: off)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bf16", action="store_true", help="torch.autocast bf16 on the device")
    ap.add_argument("--low-precision-layernorm", action="store_true",
                    help="LayerNorm in bf16 under autocast (the reference configs' algorithm)")
    ap.add_argument("--compile", action="store_true", help="torch.compile (Composer's misc.compile)")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (e.g. aot_eager for a quick tracing check)")
    ap.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True)")
    ap.add_argument("--foreach-adamw", action="store_true", help="AdamW(foreach=True)")
    ap.add_argument("--clip-norm", type=float, default=0.0,
                    help="train: clip the gradient norm (the reference configs use 0.25; 0: off)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--profile", type=int, default=0,
                    help="after timing, this many more steps (sample: runs over all --n images) under torch.profiler")
    ap.add_argument("--profile-rows", type=int, default=30, help="rows of the --profile table")
    ap.add_argument("--profile-json",
                    help="--profile: also write every name with its time to this JSON file "
                         "(tools/compare_profiles.py, against microdit bench --profile-json)")
    args = ap.parse_args()
    train = args.mode == "train"
    if args.batch is None:
        args.batch = 8 if train else 16
    if args.steps is None:
        args.steps = 10 if train else 30
    if args.warmup is None:
        args.warmup = 3 if train else 1
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.n < 1:
        die("--batch, --steps and --n must be >= 1, --warmup >= 0")
    if args.steps < 2 and not train:
        die("--steps must be >= 2 for the sampler (its step grid divides by steps - 1)")
    if not 0 <= args.mask_ratio < 1:
        die(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    if args.fused_adamw and args.foreach_adamw:
        die("give at most one of --fused-adamw and --foreach-adamw")
    if args.profile < 0 or args.profile_rows < 1:
        die("--profile must be >= 0 and --profile-rows >= 1")
    if args.profile_json and not args.profile:
        die("--profile-json needs --profile N (N >= 1)")
    if args.profile_json and not os.path.isdir(os.path.dirname(os.path.abspath(args.profile_json))):
        die(f"--profile-json {args.profile_json}: no such folder")
    if args.compile and args.warmup < 1:
        die("--compile needs --warmup >= 1 (the first step or sampler call compiles)")
    if not os.path.isfile(os.path.join(args.reference, "micro_diffusion", "models", "dit.py")):
        die(f"{args.reference}: no micro_diffusion/models/dit.py there")
    if args.device == "cuda" and not torch.cuda.is_available():
        die("--device cuda: no CUDA device visible to torch")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    EasyDict = install_stand_ins()
    sys.path.insert(0, os.path.abspath(args.reference))
    from micro_diffusion.models import dit as ref_dit, model as ref_model

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, {torch.get_num_threads()} threads")
    run = run_train if train else run_sample
    figures = run(args, device, (ref_dit, ref_model), EasyDict)
    if args.json:
        out = dict(mode=args.mode, args=vars(args), torch=torch.__version__, device=name,
                   threads=torch.get_num_threads(), **figures)
        tmp = f"{args.json}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1, default=str)
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
