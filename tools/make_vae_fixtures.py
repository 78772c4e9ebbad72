#!/usr/bin/env python3
"""VAE fixtures from diffusers' AutoencoderKL (pinned by scripts/setup_data.sh: diffusers 0.42.1).

  .venv/bin/python tools/make_vae_fixtures.py small            # -> tests/data/vae_* (committed)
  .venv/bin/python tools/make_vae_fixtures.py sdxl --out DIR    # SDXL widths, random, not committed
  .venv/bin/python tools/make_vae_fixtures.py bench --out DIR   # SDXL-config random weights only

small: the parity model of DATA_PATH.md section 6, AutoencoderKL(block_out_channels=(8,16,32,32),
layers_per_block=2, norm_num_groups=8, latent_channels=4), every tensor N(0, 0.2), saved with
save_pretrained to tests/data/vae_small/, and tests/data/vae_small_vectors.safetensors holding
x (2,3,48,40), mean, logvar (clamped), eps, sample = mean + exp(logvar/2) eps, z (2,4,6,5) and
decoded = decode(z); vae_image.png and vae_latents_8ch.safetensors for the CLI tests. Also tests/data/vae_names/: a second, smaller random model (3 levels of
distinct widths) written under every naming the loader accepts (diffusers, old attention names,
LDM/SGM with and without `first_stage_model.` and foreign keys, fp16 and bf16 copies), all of
the same tensors, so the C++ loader must produce identical weights from each.

sdxl: the SDXL config (DATA_PATH.md 1.1) with diffusers' default init, then every bias and norm
weight perturbed (so a norm bug cannot hide), a small non-square image and latent; the C++
side compares with `microdit vae parity`. The weights are 335 MB: generated at test time.
Prints "SKIPPED: ..." and exits 0 when diffusers is not installed.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")

try:
    import torch
    from safetensors.torch import save_file
    from diffusers import AutoencoderKL
except ImportError as e:  # the ctest wrapper turns this into a skip
    print(f"SKIPPED: {e.name or e} is not installed (run scripts/setup_data.sh .venv)")
    sys.exit(0)

SDXL = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(128, 256, 512, 512), scaling_factor=0.13025, sample_size=1024,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            force_upcast=True)


def small_config(block_out_channels, layers_per_block, groups):
    n = len(block_out_channels)
    return dict(block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                norm_num_groups=groups, latent_channels=4, scaling_factor=0.13025,
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


def fill_normal(model, std, gen):
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def vectors(vae, x, z, gen):
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=gen)
        sample = post.mean + post.std * eps
        decoded = vae.decode(z).sample
    return {"x": x, "mean": post.mean, "logvar": post.logvar, "eps": eps, "sample": sample,
            "z": z, "decoded": decoded}


def save_dir(vae, out):
    os.makedirs(out, exist_ok=True)
    vae.save_pretrained(out, safe_serialization=True)


# ---- the other namings, written from DATA_PATH.md 1.6 backwards -----------------------------
def to_ldm(name, tensor, levels):
    parts = name.split(".")
    def resnet_tail(rest):
        rest = list(rest)
        if rest[0] == "conv_shortcut":
            rest[0] = "nin_shortcut"
        return rest
    if parts[0] in ("encoder", "decoder"):
        side, rest = parts[0], parts[1:]
        if rest[0] == "down_blocks" and rest[2] == "resnets":
            return ".".join([side, "down", rest[1], "block", rest[3]] + resnet_tail(rest[4:])), tensor
        if rest[0] == "down_blocks" and rest[2] == "downsamplers":
            return ".".join([side, "down", rest[1], "downsample", "conv"] + rest[5:]), tensor
        if rest[0] == "up_blocks":
            level = str(levels - 1 - int(rest[1]))
            if rest[2] == "resnets":
                return ".".join([side, "up", level, "block", rest[3]] + resnet_tail(rest[4:])), tensor
            return ".".join([side, "up", level, "upsample", "conv"] + rest[5:]), tensor
        if rest[0] == "mid_block" and rest[1] == "resnets":
            return ".".join([side, "mid", "block_%d" % (int(rest[2]) + 1)] + resnet_tail(rest[3:])), tensor
        if rest[0] == "mid_block" and rest[1] == "attentions":
            sub = rest[3:]
            if sub[0] == "to_out":
                sub = ["proj_out"] + sub[2:]
            else:
                sub = [{"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v"}[sub[0]]] + sub[1:]
            if sub[0] != "norm" and sub[-1] == "weight":
                tensor = tensor[:, :, None, None]  # 1x1 conv weights
            return ".".join([side, "mid", "attn_1"] + sub), tensor
        if rest[0] == "conv_norm_out":
            return ".".join([side, "norm_out"] + rest[1:]), tensor
    return name, tensor


def to_old_attention(name):
    for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                     (".to_out.0.", ".proj_attn.")):
        name = name.replace(new, old)
    return name


def make_small(gen):
    torch.manual_seed(0)
    vae = AutoencoderKL(**small_config((8, 16, 32, 32), 2, 8)).eval()
    fill_normal(vae, 0.2, gen)
    x = (torch.rand((2, 3, 48, 40), generator=gen) * 2 - 1)
    z = torch.randn((2, 4, 6, 5), generator=gen)
    v = vectors(vae, x, z, gen)
    save_dir(vae, os.path.join(DATA, "vae_small"))
    save_file({k: t.contiguous() for k, t in v.items()}, os.path.join(DATA, "vae_small_vectors.safetensors"))
    n = sum(p.numel() for p in vae.parameters())
    print(f"vae_small: {len(vae.state_dict())} tensors, {n} parameters; "
          f"|mean| max {v['mean'].abs().max():.3f}, |decoded| max {v['decoded'].abs().max():.3f}")

    # The naming model: 3 levels of distinct widths (catches a wrong decoder-level reversal).
    names = AutoencoderKL(**small_config((4, 8, 12), 1, 4)).eval()
    fill_normal(names, 0.2, gen)
    sd = {k: t.contiguous() for k, t in names.state_dict().items()}
    out = os.path.join(DATA, "vae_names")
    save_dir(names, out)  # config.json + diffusion_pytorch_model.safetensors
    levels = 3
    ldm = dict(to_ldm(k, t, levels) for k, t in sd.items())
    save_file({k: t.contiguous() for k, t in ldm.items()}, os.path.join(out, "ldm.safetensors"))
    full = {"first_stage_model." + k: t for k, t in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2, 3)  # foreign keys, dropped
    full["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(4)
    save_file({k: t.contiguous() for k, t in full.items()}, os.path.join(out, "sgm_full.safetensors"))
    save_file({to_old_attention(k): t for k, t in sd.items()}, os.path.join(out, "old_attention.safetensors"))
    save_file({k: t.half() for k, t in sd.items()}, os.path.join(out, "fp16.safetensors"))
    save_file({k: t.bfloat16() for k, t in sd.items()}, os.path.join(out, "bf16.safetensors"))
    # For the CLI tests: a small non-square picture and latents with the wrong channel count.
    from PIL import Image
    yy, xx = torch.meshgrid(torch.arange(44.0), torch.arange(60.0), indexing="ij")
    rgb = torch.stack([xx / 59 * 255, yy / 43 * 255, 128 + 100 * torch.sin((xx + yy) / 6)], -1)
    Image.fromarray(rgb.round().clamp(0, 255).to(torch.uint8).numpy()).save(os.path.join(DATA, "vae_image.png"))
    save_file({"latents": torch.randn((1, 8, 4, 4), generator=gen)}, os.path.join(DATA, "vae_latents_8ch.safetensors"))
    print(f"vae_names: {len(sd)} tensors, {sum(t.numel() for t in sd.values())} parameters, 6 namings/dtypes")


def make_sdxl(out, seed, height, width, perturb=True):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**SDXL).eval()
    if perturb:
        with torch.no_grad():
            for name, p in vae.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
                elif p.dim() == 1:  # norm weights
                    p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.2)
    save_dir(vae, out)
    if height and width:
        x = torch.rand((1, 3, height, width), generator=gen) * 2 - 1
        z = torch.randn((1, 4, height // 8, width // 8), generator=gen)
        v = vectors(vae, x, z, gen)
        save_file({k: t.contiguous() for k, t in v.items()}, os.path.join(out, "vectors.safetensors"))
        print(f"sdxl: |mean| max {v['mean'].abs().max():.3f}, |decoded| max {v['decoded'].abs().max():.3f}")
    print(f"wrote {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["small", "sdxl", "bench"])
    ap.add_argument("--out", help="output folder (sdxl, bench)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=40)
    ap.add_argument("--width", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if a.what == "small":
        make_small(torch.Generator().manual_seed(a.seed + 2024))
    else:
        if not a.out:
            ap.error("--out is required")
        make_sdxl(a.out, a.seed, a.height if a.what == "sdxl" else 0, a.width if a.what == "sdxl" else 0)


if __name__ == "__main__":
    main()
