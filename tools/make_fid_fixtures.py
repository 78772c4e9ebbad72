#!/usr/bin/env python3
"""FID fixtures from PyPI pytorch-fid 0.3.0 (scripts/setup_data.sh installs it in the venv).

  make_fid_fixtures.py stats OUT_DIR      small committed fixtures (tests/data/fid_*): features,
                                          statistics .npz (np.savez and np.savez_compressed) and
                                          pytorch-fid's calculate_frechet_distance on them.
  make_fid_fixtures.py inception OUT_DIR  random-weight InceptionV3([3]) parity data (~90 MB, written
                                          at test time into the build folder, never committed):
                                          weights (pytorch-fid and torchvision names), 4 PNG images
                                          and pytorch-fid's features of them.
"""
import json
import os
import sys

import numpy as np


def stats(out):
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(11)
    cases = {}
    # Well conditioned: 300 samples of 64-d features (float32, as pytorch-fid's activations).
    mix = rng.normal(size=(64, 64)) / 8
    fa = (rng.normal(size=(300, 64)) @ mix).astype(np.float32)
    fb = (rng.normal(size=(300, 64)) @ (mix + 0.05 * rng.normal(size=(64, 64))) + 0.3).astype(np.float32)
    # Rank deficient: 20 samples of 64-d features (covariance rank 19, as small eval sets).
    fc = rng.normal(size=(20, 64)).astype(np.float32)
    fd = (rng.normal(size=(20, 64)) * 1.5 + 0.1).astype(np.float32)
    np.savez(os.path.join(out, "fid_features.npz"), a=fa, b=fb, c=fc, d=fd)
    for name, (x, y) in {"ab": (fa, fb), "cd": (fc, fd)}.items():
        m1, s1 = np.mean(x, axis=0), np.cov(x, rowvar=False)
        m2, s2 = np.mean(y, axis=0), np.cov(y, rowvar=False)
        cases[name] = float(calculate_frechet_distance(m1, s1, m2, s2))
    # Statistics files as pytorch-fid's save_fid_stats writes them (compressed) and as np.savez.
    m, s = np.mean(fa, axis=0), np.cov(fa, rowvar=False)
    np.savez_compressed(os.path.join(out, "fid_stats_a_compressed.npz"), mu=m, sigma=s)
    np.savez(os.path.join(out, "fid_stats_a.npz"), mu=m, sigma=s)
    with open(os.path.join(out, "fid_expected.json"), "w") as f:
        json.dump({"distance": cases, "pytorch_fid": "0.3.0", "numpy": np.__version__}, f, indent=1)
        f.write("\n")


def randomize(model, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv.weight"):
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith("bn.weight") or name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("bn.bias") or name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                raise SystemExit(f"unexpected tensor {name}")


def inception(out):
    import torch
    from PIL import Image
    from pytorch_fid.fid_score import get_activations
    from pytorch_fid.inception import InceptionV3
    from safetensors.torch import save_file

    import pytorch_fid.inception as pfi
    import torchvision

    # pytorch-fid downloads the released weights while building the network: build it without
    # them (random weights below), restoring both hooks afterwards.
    load_url, load_sd = pfi.load_state_dict_from_url, torchvision.models.inception.Inception3.load_state_dict
    pfi.load_state_dict_from_url = lambda *a, **k: None
    torchvision.models.inception.Inception3.load_state_dict = lambda self, *a, **k: None
    try:
        torch.manual_seed(0)
        model = InceptionV3([3]).eval()
    finally:
        pfi.load_state_dict_from_url, torchvision.models.inception.Inception3.load_state_dict = load_url, load_sd
    randomize(model, 1234)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, os.path.join(out, "fid_inception_random.pth"))  # pytorch-fid names (blocks.*)
    tv = {}  # torchvision names, as the released pt_inception .pth
    names = {"0.0": "Conv2d_1a_3x3", "0.1": "Conv2d_2a_3x3", "0.2": "Conv2d_2b_3x3", "1.0": "Conv2d_3b_1x1",
             "1.1": "Conv2d_4a_3x3"}
    for j, n in enumerate(["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                           "Mixed_6e"]):
        names[f"2.{j}"] = n
    for j, n in enumerate(["Mixed_7a", "Mixed_7b", "Mixed_7c"]):
        names[f"3.{j}"] = n
    for k, v in sd.items():
        parts = k.split(".")
        tv[names[parts[1] + "." + parts[2]] + "." + ".".join(parts[3:])] = v
    tv["fc.weight"] = torch.zeros(1008, 2048)  # present in the released file, unused by FID
    tv["fc.bias"] = torch.zeros(1008)
    save_file(tv, os.path.join(out, "fid_inception_random.safetensors"))
    # The released pt_inception .pth predates the zip format: the same tensors in legacy torch.save.
    import collections
    torch.save(collections.OrderedDict(tv), os.path.join(out, "fid_inception_random_legacy.pth"),
               _use_new_zipfile_serialization=False)
    rng = np.random.default_rng(5)
    files = []
    for i in range(4):  # 80 wide, 64 high: smooth colour fields plus noise
        y, x = np.mgrid[0:64, 0:80]
        base = np.stack([128 + 100 * np.sin(x / (7 + i) + c) * np.cos(y / (5 + c + i)) for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        p = os.path.join(out, f"img_{i}.png")
        Image.fromarray(img).save(p)
        files.append(p)
    feats = get_activations(files, model, batch_size=4, dims=2048, device="cpu", num_workers=0)
    np.savez(os.path.join(out, "fid_inception_features.npz"), features=feats.astype(np.float32))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("stats", "inception"):
        raise SystemExit(__doc__)
    try:
        import pytorch_fid  # noqa: F401
    except ImportError:
        print("SKIPPED: pytorch-fid is not installed (scripts/setup_data.sh installs it)")
        sys.exit(0)
    os.makedirs(sys.argv[2], exist_ok=True)
    {"stats": stats, "inception": inception}[sys.argv[1]](sys.argv[2])
    print(f"wrote {sys.argv[1]} fixtures to {sys.argv[2]}")
