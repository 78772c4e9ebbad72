"""Fits the rational erf of src/kernels/avx512_math.h (erf_rational16).

erf(z) ~ z P(z^2) / Q(z^2) on [0, zmax] (odd, so the fit holds on [-zmax, zmax]), P of degree
p and Q of degree q with Q(0) = 1. Linear least squares on z P - erf(z) Q, weighted by 1 / Q of the
previous pass (Sanathanan-Koerner) and, after ten passes, by the error (Lawson) to push towards
the minimax fit; the best pass is kept. Prints the largest error in float64 and as the kernel
computes it in float32 (Horner, z clamped to zmax), then the float32 coefficients, lowest degree
first, as they appear in the kernel.

    .venv/bin/python tools/fit_erf.py 4.0 6 5
"""
import sys

import mpmath
import numpy as np


def fit(zmax, p, q, points=8000, passes=60):
    z = np.linspace(0.0, zmax, points)
    t = z * z
    f = np.array([float(mpmath.erf(v)) for v in z])
    q_prev, lawson = np.ones_like(z), np.ones_like(z)
    best = None
    for it in range(passes):
        # unknowns a_0..a_p, b_1..b_q: z P(t) - f (Q(t) - 1) = f
        cols = [z * t**i for i in range(p + 1)] + [-f * t**i for i in range(1, q + 1)]
        w = np.sqrt(lawson) / np.abs(q_prev)
        sol, *_ = np.linalg.lstsq(np.stack(cols, 1) * w[:, None], f * w, rcond=None)
        a, b = sol[: p + 1], np.concatenate([[1.0], sol[p + 1 :]])
        q_val = np.polyval(b[::-1], t)
        err = z * np.polyval(a[::-1], t) / q_val - f
        worst = np.abs(err).max()
        if best is None or worst < best[0]:
            best = (worst, a.copy(), b.copy())
        q_prev = q_val
        if it >= 10:
            lawson = lawson * np.abs(err)
            lawson /= lawson.max()
    return best


def horner32(c, t):
    r = np.full_like(t, c[-1])
    for x in c[-2::-1]:
        r = (r * t + x).astype(np.float32)
    return r


def main():
    zmax, p, q = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    worst, a, b = fit(zmax, p, q)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    z = np.linspace(0, 6, 60001).astype(np.float32)
    zc = np.minimum(z, np.float32(zmax))
    t = (zc * zc).astype(np.float32)
    r = np.minimum((zc * horner32(a32, t) / horner32(b32, t)).astype(np.float32), np.float32(1))
    ref = np.array([float(mpmath.erf(v)) for v in z])
    print(f"max error: float64 {worst:.3e}, float32 {np.abs(r - ref).max():.3e}")
    print("P:", [float(x) for x in a32])
    print("Q:", [float(x) for x in b32])


if __name__ == "__main__":
    main()
