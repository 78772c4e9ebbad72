#!/usr/bin/env python3
"""Make a parity-vector file (shared/reference format) by running the *reference* MicroDiT.

Development tool: needs a checkout of the reference (SonyResearch/micro_diffusion) and
torch, numpy, safetensors (all in the project venv). The reference's heavy imports that
the network does not use (open_clip, transformers, composer, diffusers, torchmetrics, timm)
are replaced by small stand-ins; the network, masking and EDM code run unmodified.

    .venv/bin/python tools/make_parity_vectors.py --reference /path/to/micro_diffusion-checkout \
        --out tests/data/parity_b.safetensors --set dim=64 depth=3 use_bias=true ...
"""
import argparse
import functools
import json
import sys
import types

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

# Reference DiT constructor defaults and the run settings, as in the shared file's metadata.
DEFAULTS = dict(input_size=8, patch_size=2, in_channels=4, dim=64, depth=4, head_dim=16,
                multiple_of=16, caption_channels=32, pos_interp_scale=1.0, qkv_ratio=[0.5, 1.0],
                mlp_ratio=[0.5, 4.0], patch_mixer_depth=2, patch_mixer_dim=48,
                patch_mixer_mlp_ratio=4.0, use_bias=False, num_experts=4, expert_capacity=2.0,
                experts_every_n=2, seed=0, batch=3, caption_len=7, mask_ratio=0.75, cfg_scale=4.0,
                sample_steps=4, p_mean=-0.6, p_std=1.2, sigma_data=0.9)


def install_stand_ins():
    """Stand-ins for imports the network code does not use at all."""
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class Unused:
        def __init__(self, *a, **k):
            raise RuntimeError("not available in the parity tool")

    class PatchEmbed(nn.Module):  # the part of timm's PatchEmbed the reference uses
        def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
            super().__init__()
            self.patch_size = (patch_size, patch_size)
            self.num_patches = (img_size // patch_size) ** 2
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class EasyDict(dict):
        __getattr__ = dict.__getitem__

    module("open_clip")
    module("transformers", CLIPTextModel=Unused, CLIPTokenizer=Unused, T5EncoderModel=Unused,
           T5Tokenizer=Unused)
    module("torchmetrics", Metric=nn.Module)
    module("timm"); module("timm.models")
    module("timm.models.vision_transformer", PatchEmbed=PatchEmbed)
    module("composer"); module("composer.models", ComposerModel=nn.Module)
    module("diffusers", AutoencoderKL=Unused)
    module("easydict", EasyDict=EasyDict)
    try:
        import einops  # noqa: F401
    except ImportError:
        module("einops", rearrange=None)
    return EasyDict


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="folder holding micro_diffusion/models/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", nargs="*", default=[], help="key=value (JSON values)")
    args = ap.parse_args()
    cfg = dict(DEFAULTS)
    for kv in args.set:
        k, v = kv.split("=", 1)
        if k not in cfg:
            sys.exit(f"unknown setting {k}")
        cfg[k] = json.loads(v)

    EasyDict = install_stand_ins()
    sys.path.insert(0, args.reference)
    from micro_diffusion.models import dit as ref_dit, model as ref_model, utils as ref_utils

    torch.manual_seed(cfg["seed"])
    depth = cfg["depth"]
    ctor = {k: cfg[k] for k in ["input_size", "patch_size", "in_channels", "dim", "depth",
                                "head_dim", "multiple_of", "caption_channels", "pos_interp_scale",
                                "patch_mixer_depth", "patch_mixer_dim", "patch_mixer_mlp_ratio",
                                "use_bias", "num_experts", "expert_capacity", "experts_every_n"]}
    model = ref_dit.DiT(**ctor, norm_eps=1e-6, depth_init=True, use_patch_mixer=True,
                        patch_mixer_qkv_ratio=1.0,
                        qkv_multipliers=np.linspace(*cfg["qkv_ratio"], num=depth, dtype=float),
                        ffn_multipliers=np.linspace(*cfg["mlp_ratio"], num=depth, dtype=float))
    # Random values everywhere (the reference init zeroes many weights, hiding mistakes).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name or name.endswith(".0.weight") and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.normal_(0, 0.1)
            elif p.dim() == 3:  # MoE (E, in, out)
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.normal_(0, (p[0].numel()) ** -0.5)
        model.mask_token.normal_(0, 0.1)
    model.train()

    B, L, Cc = cfg["batch"], cfg["caption_len"], cfg["caption_channels"]
    C, H, p = cfg["in_channels"], cfg["input_size"], cfg["patch_size"]
    T = (H // p) ** 2
    t = {}
    t["in.x"] = torch.randn(B, C, H, H)
    t["in.t"] = torch.randn(B) * 0.4 - 0.2
    t["in.y"] = torch.randn(B, 1, L, Cc)
    x, tt, y = t["in.x"], t["in.t"], t["in.y"]

    # Router near-ties would make expert choices depend on rounding: refuse such draws.
    gaps = []
    def gate_hook(mod, inp, out):
        probs = torch.softmax(out, -1).transpose(1, 2)  # (B, E, T')
        k = int(cfg["expert_capacity"] * probs.shape[-1] / cfg["num_experts"])
        if 0 < k < probs.shape[-1]:
            top = probs.detach().topk(k + 1, -1).values
            gaps.append(float((top[..., k - 1] - top[..., k]).min()))
    for m in model.modules():
        if isinstance(m, ref_dit.FeedForwardECMoe):
            m.gate.register_forward_hook(gate_hook)

    with torch.no_grad():
        t["out.sample_nomask"] = model(x, tt, y)["sample"]
        t["out.sample_cfg"] = model(x, tt, y, cfg=cfg["cfg_scale"])["sample"]

    noise = torch.rand(B, T)
    real_get_mask = ref_utils.get_mask
    def fixed_get_mask(batch, length, mask_ratio, device):
        saved = torch.rand
        torch.rand = lambda *a, **k: noise.clone()
        try:
            return real_get_mask(batch, length, mask_ratio, device)
        finally:
            torch.rand = saved
    ref_dit.get_mask = fixed_get_mask
    m = fixed_get_mask(B, T, cfg["mask_ratio"], "cpu")
    t["in.mask_noise"], t["in.ids_keep"], t["in.ids_restore"], t["out.mask"] = (
        noise, m["ids_keep"], m["ids_restore"], m["mask"])
    with torch.no_grad():
        t["out.sample_masked"] = model(x, tt, y, mask_ratio=cfg["mask_ratio"])["sample"]

    # EDM, through the reference's LatentDiffusion methods on a minimal stand-in `self`.
    rnd = torch.randn(B, 1, 1, 1)
    eps = torch.randn(B, C, H, H)
    edm = types.SimpleNamespace(
        edm_config=EasyDict(sigma_min=0.002, sigma_max=80, P_mean=cfg["p_mean"], P_std=cfg["p_std"],
                            sigma_data=cfg["sigma_data"], num_steps=18, rho=7, S_churn=0, S_min=0,
                            S_max=float("inf"), S_noise=1),
        dit=model, randn_like=lambda like: eps.clone())
    LD = ref_model.LatentDiffusion
    edm.model_forward_wrapper = functools.partial(LD.model_forward_wrapper, edm)
    saved_randn = torch.randn
    torch.randn = lambda *a, **k: rnd.clone()
    try:
        model.zero_grad()
        loss = LD.edm_loss(edm, x, y, mask_ratio=cfg["mask_ratio"])
        loss.backward()
        with torch.no_grad():
            loss_nomask = LD.edm_loss(edm, x, y, mask_ratio=0)
    finally:
        torch.randn = saved_randn
    t["in.edm_rnd_normal"], t["in.edm_noise"] = rnd, eps
    t["out.edm_loss_masked"] = loss.detach().reshape(1)
    t["out.edm_loss_nomask"] = loss_nomask.reshape(1)
    for name, prm in model.named_parameters():
        if prm.grad is not None:
            t["grad." + name] = prm.grad.clone()

    t["in.sigma"] = torch.rand(B) * 1.5 + 0.1
    edm.randn_like = torch.randn_like
    with torch.no_grad():
        t["out.denoised"] = edm.model_forward_wrapper(x, t["in.sigma"], y, model.forward,
                                                      mask_ratio=0)["sample"]
        t["in.sampler_init"] = torch.randn(B, C, H, H)
        t["out.sampler_final"] = LD.edm_sampler_loop(edm, t["in.sampler_init"], y,
                                                     cfg["sample_steps"], cfg=cfg["cfg_scale"])
    t["out.t_freq"] = ref_utils.TimestepEmbedder.timestep_embedding(tt, 512)
    g = H // p
    t["out.pos_embed"] = model.pos_embed.clone()
    t["out.pos_embed_2x_interp2"] = torch.from_numpy(ref_utils.get_2d_sincos_pos_embed(
        cfg["dim"], 2 * g, pos_interp_scale=2.0, base_size=g)).float()
    for name, v in model.state_dict().items():
        t["model." + name] = v
    if gaps and min(gaps) < 1e-5:
        sys.exit(f"router near-tie (gap {min(gaps):.2e}): pick another seed")

    meta = {k: json.dumps(v) for k, v in cfg.items()}
    meta["reference"] = "SonyResearch/micro_diffusion models/dit.py+model.py, fp32 CPU"
    save_file({k: v.contiguous() for k, v in t.items()}, args.out, metadata=meta)
    print(f"wrote {args.out}: {len(t)} tensors, min router gap {min(gaps) if gaps else 'n/a'}")


if __name__ == "__main__":
    main()
