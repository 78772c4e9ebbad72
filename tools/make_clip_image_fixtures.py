#!/usr/bin/env python3
"""CLIP-score parity data from open_clip (in the project venv), random weights, small ViT.

  make_clip_image_fixtures.py OUT_DIR   writes clip_small.safetensors (an open_clip CLIP state dict:
                                        ViT image tower 56 px / patch 14 / width 128 / 2 layers /
                                        2 heads, text tower width 128 / 2 layers, embed 32), and
                                        clip_expected.safetensors: preprocessed pixels, token ids,
                                        unit image/text features and 100 x cosine; plus one PNG and
                                        open_clip's preprocessing of it. ~30 MB: written at test time
                                        into the build folder, never committed.
  make_clip_image_fixtures.py --vit-h   prints the parameter count and a few shapes of open_clip's
                                        ViT-H-14 (no weights: meta device), for the structural test.
"""
import json
import os
import sys

import numpy as np


def vit_h():
    import open_clip
    import torch

    with torch.device("meta"):
        model = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    sd = model.visual.state_dict()
    print(json.dumps({"visual_params": sum(v.numel() for v in sd.values()), "visual_tensors": len(sd),
                      "names": sorted(sd)[:5]}))


def small(out):
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 56, "patch_size": 14, "width": 128, "layers": 2, "head_width": 64},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
    ).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # perturb everything (LayerNorms and biases too) so parity sees each tensor
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out, "clip_small.safetensors"))
    pixels = torch.randn(3, 3, 56, 56, generator=g)
    captions = ["a photo of a red heart", "two cats on a sofa", "an emoji of a smiling face"]
    ids = open_clip.tokenize(captions)
    with torch.no_grad():
        fi = model.encode_image(pixels, normalize=True)
        ft = model.encode_text(ids, normalize=True)
    score = 100 * (fi * ft).sum(-1)
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    Image.fromarray(img).save(os.path.join(out, "clip_img.png"))
    preprocess = open_clip.transform.image_transform(56, is_train=False)
    pre = preprocess(Image.open(os.path.join(out, "clip_img.png")))
    save_file({"pixels": pixels, "ids": ids.to(torch.int64), "image_features": fi, "text_features": ft,
               "scores": score, "preprocessed": pre.contiguous()}, os.path.join(out, "clip_expected.safetensors"))


if __name__ == "__main__":
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("SKIPPED: open_clip is not installed in this venv")
        sys.exit(0)
    if len(sys.argv) == 2 and sys.argv[1] == "--vit-h":
        vit_h()
    elif len(sys.argv) == 2:
        os.makedirs(sys.argv[1], exist_ok=True)
        small(sys.argv[1])
        print(f"wrote CLIP fixtures to {sys.argv[1]}")
    else:
        raise SystemExit(__doc__)
