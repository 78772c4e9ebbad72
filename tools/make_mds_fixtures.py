#!/usr/bin/env python3
"""MDS fixtures for tests/test_mds.cpp, written by PyPI mosaicml-streaming 0.13.0.

Run in the streaming venv that scripts/setup_data.sh makes:
  ~/.cache/microdit/venv-streaming0.13.0-py311/bin/python tools/make_mds_fixtures.py tests/data

Writes tests/data/mds_<name>/ datasets and tests/data/mds_fixtures.json, which holds for every
dataset the writer options, the columns, every sample's encoded payloads (hex, in sorted column
order: what the C++ writer is fed to reproduce the files) and streaming's decoded values.
"""
import decimal
import io
import json
import os
import shutil
import sys
import zlib

import numpy as np
import streaming
from PIL import Image
from streaming import MDSWriter
from streaming.base.format.mds.encodings import mds_decode, mds_encode
from streaming.base.util import merge_index


def tiny_jpeg() -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.arange(8 * 6 * 3, dtype=np.uint8).reshape(6, 8, 3)).save(b, "JPEG", quality=90)
    return b.getvalue()


def tiny_png() -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.arange(5 * 3 * 3, dtype=np.uint8).reshape(3, 5, 3) * 5).save(b, "PNG")
    return b.getvalue()


def jsonable(v):
    if isinstance(v, np.ndarray):
        return {"dtype": v.dtype.name, "shape": list(v.shape), "values": v.ravel().tolist()}
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, Image.Image):
        return {"image": [v.width, v.height, v.mode]}
    return v


def f16(shape, seed):
    rng = np.random.RandomState(seed)
    return rng.standard_normal(shape).astype(np.float16)


DATASETS = {}


def dataset(name, columns, samples, **kw):
    DATASETS[name] = (columns, samples, kw)


# 1. The reference's latent schema (DATA_PATH.md 2.3) with small latents: caption_latents
#    (1, 77, 4), latents_256 (4, 32, 32), latents_512 (1, 64, 64): C inferred from the bytes.
dataset("latent", {"caption": "str", "caption_latents": "bytes", "latents_256": "bytes", "latents_512": "bytes"},
        [{"caption": c, "caption_latents": f16((1, 77, 4), 10 + i).tobytes(),
          "latents_256": (f16((4, 32, 32), 20 + i) * np.float16(0.13025)).tobytes(),
          "latents_512": f16((1, 64, 64), 30 + i).tobytes()}
         for i, c in enumerate(["a photo of a cat", "caf\u00e9 \u2615 \U0001f431 \"quoted\"\n"])],
        size_limit=268435456)

# 2. Every encoding family the reader decodes, several samples.
ENC = {"a_int": "int", "b_int8": "int8", "c_int16": "int16", "d_int32": "int32", "e_int64": "int64",
       "f_uint8": "uint8", "g_uint16": "uint16", "h_uint32": "uint32", "i_uint64": "uint64",
       "j_float16": "float16", "k_float32": "float32", "l_float64": "float64", "m_str_int": "str_int",
       "n_str_float": "str_float", "o_str_decimal": "str_decimal", "p_nd_fixed": "ndarray:int16:2,3",
       "q_nd_dtype": "ndarray:float32", "r_nd": "ndarray", "s_str": "str", "t_bytes": "bytes",
       "u_json": "json", "v_jpeg": "jpeg", "w_png": "png", "x_nd_wide": "ndarray", "y_nd_u8": "ndarray:uint8:4"}
enc_samples = []
for i in range(3):
    s = -1 if i == 1 else 1
    enc_samples.append({
        "a_int": s * (2**40 + i), "b_int8": s * 100, "c_int16": s * 30000, "d_int32": s * (2**31 - 1 - i),
        "e_int64": s * (2**62 + i), "f_uint8": 200 + i, "g_uint16": 60000 + i, "h_uint32": 4000000000 + i,
        "i_uint64": 2**63 + i, "j_float16": 0.333 * s, "k_float32": 1.5e-7 * s, "l_float64": 2.0 ** 0.5 * s,
        "m_str_int": s * (10**15 + i), "n_str_float": 0.1 * (i + 1) * s, "o_str_decimal": decimal.Decimal(f"{s * 3}.14{i}"),
        "p_nd_fixed": np.arange(6, dtype=np.int16).reshape(2, 3) * s,
        "q_nd_dtype": np.linspace(-1, 1, 2 + i, dtype=np.float32).reshape(1, -1),
        "r_nd": [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([[7, 8]], np.uint64),
                 np.ones((1, 2, 1, 2), np.float64)][i],
        "s_str": ["", "h\u00e9llo", "tab\tnew\nline"][i], "t_bytes": bytes(range(i * 3)),
        "u_json": {"b": [1, 2.5, None], "a": "x\u00ff", "n": i},
        "v_jpeg": tiny_jpeg(), "w_png": tiny_png(),
        "x_nd_wide": np.arange(300 + i, dtype=np.uint8).reshape(1, -1), "y_nd_u8": np.array([i, 1, 2, 255], np.uint8)})
dataset("encodings", ENC, enc_samples)

# 3. zstd + hashes + a size limit below the config size: a leading 0-sample shard, then one
#    sample per (over-limit) shard.
dataset("zstd", {"id": "int", "text": "str", "arr": "ndarray:float32"},
        [{"id": i, "text": "sample %d %s" % (i, "x" * (i * 7)), "arr": np.arange(i + 1, dtype=np.float32) / 3}
         for i in range(5)],
        compression="zstd", hashes=["sha1", "xxh64"], size_limit=200)

# 4. Several uncompressed shards through the rollover rule, and zstd:7.
dataset("multi", {"id": "int", "text": "str"},
        [{"id": i, "text": "t" * (i % 5)} for i in range(40)], size_limit=450)
dataset("zstd7", {"id": "int", "text": "str"}, [{"id": i, "text": "z%d" % i} for i in range(4)],
        compression="zstd:7", hashes=["md5", "sha256", "xxh64"])

# 5. No samples at all.
dataset("empty", {"id": "int"}, [])

# 6. gz (read) and br (refused) compression.
dataset("gz", {"id": "int", "text": "str"}, [{"id": i, "text": "g%d" % i} for i in range(3)], compression="gz")
dataset("br", {"id": "int"}, [{"id": 1}], compression="br")


def write(outdir, name, columns, samples, kw):
    d = os.path.join(outdir, "mds_" + name)
    if os.path.exists(d):
        shutil.rmtree(d)
    with MDSWriter(out=d, columns=columns, **kw) as w:
        for s in samples:
            w.write(s)
    return d


def payload_json(b: bytes):
    """Small payloads in hex, large ones (latents) by CRC-32 and size."""
    if len(b) <= 1024:
        return {"hex": b.hex()}
    return {"crc32": zlib.crc32(b) & 0xFFFFFFFF, "bytes": len(b)}


def describe(columns, samples, kw):
    names = sorted(columns)
    payloads, values = [], []
    for s in samples:
        payloads.append([payload_json(mds_encode(columns[n], s[n])) for n in names])
        values.append({n: jsonable(mds_decode(columns[n], mds_encode(columns[n], s[n])))
                       for n in names if columns[n] not in ("jpeg", "png", "bytes")})
    return {"columns": [[n, columns[n]] for n in names], "options": kw, "payloads": payloads, "values": values}


def main():
    outdir = sys.argv[1] if len(sys.argv) > 1 else "tests/data"
    doc = {"generator": "make_mds_fixtures.py", "streaming": streaming.__version__, "datasets": {}}
    for name, (columns, samples, kw) in DATASETS.items():
        d = write(outdir, name, columns, samples, kw)
        doc["datasets"][name] = describe(columns, samples, kw)
        if name == "br":  # leave only the compressed file: the reader must refuse it
            os.remove(os.path.join(d, "index.json"))
            w = MDSWriter(out=d + "_tmp", columns=columns, **kw)
            w.write(samples[0]); w.finish()
            shutil.rmtree(d)
            os.rename(d + "_tmp", d)
    # 7. Two subdirectories merged as the reference's multi-GPU precompute does.
    root = os.path.join(outdir, "mds_merged")
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    merged = {}
    for sub, n in (("0", 3), ("1", 2)):
        cols = {"caption": "str", "idx": "int"}
        samples = [{"caption": f"part {sub} sample {i}", "idx": int(sub) * 100 + i} for i in range(n)]
        with MDSWriter(out=os.path.join(root, sub), columns=cols, size_limit=230) as w:
            for s in samples:
                w.write(s)
        merged[sub] = describe(cols, samples, {"size_limit": 230})
    merge_index(root)
    doc["merged"] = merged
    with open(os.path.join(outdir, "mds_fixtures.json"), "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(DATASETS) + 1} MDS datasets to {outdir}")


if __name__ == "__main__":
    main()
