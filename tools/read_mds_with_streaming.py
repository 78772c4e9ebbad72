#!/usr/bin/env python3
"""Reads MDS folders with mosaicml-streaming's StreamingDataset (local only, no shuffle) and
prints {"size": N, "samples": [...]} as JSON: bytes as {"hex"} (or {"crc32", "bytes"} over
1 KiB), arrays as {"dtype", "shape", "values"}, numpy scalars as numbers. Used by
tests/test_mds.cpp to check that streaming reads what the C++ writer made.

usage: <streaming venv>/bin/python tools/read_mds_with_streaming.py DIR [DIR ...]
"""
import json
import sys
import zlib

import numpy as np
from streaming import Stream, StreamingDataset
from streaming.base.util import clean_stale_shared_memory


def jsonable(v):
    if isinstance(v, np.ndarray):
        return {"dtype": v.dtype.name, "shape": list(v.shape), "values": v.ravel().tolist()}
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        if len(v) <= 1024:
            return {"hex": v.hex()}
        return {"crc32": zlib.crc32(v) & 0xFFFFFFFF, "bytes": len(v)}
    return v


def main():
    dirs = sys.argv[1:]
    clean_stale_shared_memory()
    streams = [Stream(local=d) for d in dirs]
    ds = StreamingDataset(streams=streams, shuffle=False, batch_size=1)
    samples = [{k: jsonable(v) for k, v in ds[i].items()} for i in range(len(ds))]
    print(json.dumps({"size": len(ds), "samples": samples}, sort_keys=True))


if __name__ == "__main__":
    main()
