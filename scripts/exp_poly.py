#!/usr/bin/env python3
"""Fits the polynomial behind tome's vector `exp` (crates/tome-attn/src/simd.rs, `EXP_POLY`).

e^x = 2^n · e^r with n = round(x / ln 2) and |r| <= ln 2 / 2; e^r is a degree-5 polynomial with
constant term exactly 1 (so e^0 = 1 exactly: the online softmax's correction is then exactly 1
while the running max holds) whose other coefficients minimise the largest relative error on
that interval (Lawson's iteratively reweighted least squares converges to the minimax fit). The script then evaluates the whole exp
the way the kernels do — f32 coefficients, one rounding per fused multiply-add — and prints the
worst relative error over the range the kernels use, in units of f32 epsilon.

Usage: python3 scripts/exp_poly.py   (needs numpy)
"""
import numpy as np

DEGREE = 5
HALF_LN2 = np.log(2) / 2


def fit(degree=DEGREE, iterations=300):
    # Slightly past ln 2 / 2: the two-step reduction in f32 can land just outside it.
    x = np.cos(np.linspace(0, np.pi, 4001)) * HALF_LN2 * 1.02
    f = np.exp(x)
    # Relative error (1 + Σ c_k r^k) / e^r - 1, linear in c_1..c_degree.
    basis = np.vander(x, degree + 1, increasing=True)[:, 1:] / f[:, None]
    target = 1 - 1 / f
    weights = np.ones_like(x)
    for _ in range(iterations):
        root = np.sqrt(weights)
        coeffs, *_ = np.linalg.lstsq(basis * root[:, None], target * root, rcond=None)
        weights *= np.abs(basis @ coeffs - target)
        weights /= weights.sum()
    return np.concatenate([[1.0], coeffs]).astype(np.float32)


def fma(a, b, c):
    # The f32 product of two f32 values is exact in f64, so this rounds once, like FMA.
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def exp_f32(x, coeffs):
    n = np.floor(fma(x, np.float32(np.log2(np.e)), np.float32(0.5)))
    r = fma(-n, np.float32(0.693359375), x)
    r = fma(-n, np.float32(-2.12194440e-4), r)
    p = coeffs[-1]
    for c in coeffs[-2::-1]:
        p = fma(p, r, c)
    return np.float64(p) * 2.0 ** np.float64(n)


def main():
    coeffs = fit()
    xs = np.random.default_rng(0).uniform(-87.0, 88.0, 100_000).astype(np.float32)
    worst = max(abs(exp_f32(x, coeffs) / np.exp(np.float64(x)) - 1) for x in xs)
    print("coefficients, highest degree first:")
    for c in coeffs[::-1]:
        print(f"    {float(c)!r},")
    print(f"worst relative error: {worst:.3e} = {worst / np.finfo(np.float32).eps:.2f} f32 epsilon")


if __name__ == "__main__":
    main()
