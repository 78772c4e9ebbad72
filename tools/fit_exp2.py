"""Fits the polynomial of src/kernels/avx512_math.h's exp2_16: 2^f on [-1/2, 1/2].

p(f) = 1 + c1 f + ... + cD f^D (p(0) = 1 exactly), linear least squares on the relative error
p(f) / 2^f - 1, reweighted by the error (Lawson) towards the minimax fit; the best pass is kept.
Prints the largest relative error of the fit in float64 and of the kernel as it computes 2^x in
float32 (n = round(x), f = x - n, Horner, times 2^n) over [-126, 0], in units of 2^-24 too, and the
float32 coefficients, lowest degree first, as they appear in the kernel.

    .venv/bin/python tools/fit_exp2.py 6
"""
import sys

import numpy as np


def fit(degree, points=4000, passes=40):
    f = np.linspace(-0.5, 0.5, points)
    y = 2.0**f
    a = np.stack([f**i for i in range(1, degree + 1)], 1) / y[:, None]
    b = (y - 1) / y
    lawson = np.ones_like(f)
    best = None
    for _ in range(passes):
        w = np.sqrt(lawson)
        c, *_ = np.linalg.lstsq(a * w[:, None], b * w, rcond=None)
        c = np.concatenate([[1.0], c])
        err = np.polyval(c[::-1], f) / y - 1
        worst = np.abs(err).max()
        if best is None or worst < best[0]:
            best = (worst, c.copy())
        lawson = lawson * np.abs(err)
        lawson /= lawson.max()
    return best


def main():
    degree = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    worst, c = fit(degree)
    c32 = c.astype(np.float32)
    x = np.linspace(-126, 0, 2_000_001).astype(np.float32)
    n = np.rint(x).astype(np.float32)
    f = (x - n).astype(np.float32)
    p = np.full_like(f, c32[-1])
    for k in c32[-2::-1]:
        p = (p.astype(np.float64) * f + k).astype(np.float32)  # one rounding a step, as a fused multiply-add
    r = np.ldexp(p.astype(np.float64), n.astype(np.int64)).astype(np.float32)
    rel = np.abs(r / 2.0 ** x.astype(np.float64) - 1).max()
    print(f"max relative error: fit {worst:.3e}, float32 {rel:.3e} ({rel * 2**24:.2f} x 2^-24)")
    print("c:", [float(v) for v in c32])


if __name__ == "__main__":
    main()
