"""Reads a latent MDS written by `microdit prepare --images` with mosaicml-streaming's
StreamingDataset and prints what it sees as one JSON line (tests/test_prepare_latents.cpp checks it).

usage: python prepare_streaming_check.py DIR SIZE CAPTION_WIDTH
"""
import json
import sys

import numpy as np
from streaming import StreamingDataset

out_dir, size, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ds = StreamingDataset(local=out_dir, shuffle=False, batch_size=1)
rows = [ds[i] for i in range(len(ds))]
first = rows[0]
lat = np.frombuffer(first[f"latents_{size}"], dtype=np.float16)
cap = np.frombuffer(first["caption_latents"], dtype=np.float16).reshape(1, -1, width)
print(json.dumps({
    "count": len(ds),
    "columns": sorted(first.keys()),
    "captions": [r["caption"] for r in rows],
    "latents": lat.reshape(-1, size // 8, size // 8).astype(float).tolist(),
    "caption_shape": list(cap.shape),
    "caption_first": cap[0, 0, :4].astype(float).tolist(),
}))
