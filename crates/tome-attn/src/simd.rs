//! The arithmetic the portable kernel's hot loops are built from (the vector paths have theirs in
//! `transposed`, over the lanes of `avx2` and `avx512`), with the exp they all share.
//!
//! Every helper is `#[inline(always)]` so that it is compiled inside the caller's
//! `#[target_feature]` context, where LLVM turns the fixed-width lane loops into vector code.
//! `exp` is our own (range reduction by ln 2, then a degree-5 minimax polynomial in Horner form,
//! under 2 ulp): the scalar libm call would otherwise cost more than the matmuls around it.

/// Multiply-add as the target can do it, and the tile loops built on it.
pub(crate) trait Arith {
    fn fma(a: f32, b: f32, c: f32) -> f32;

    /// Replaces each `x` of the row by `e^(x - m)` and returns their sum.
    #[inline(always)]
    fn exp_shift_sum(row: &mut [f32], m: f32) -> f32 {
        exp_shift_sum_scalar::<Self>(row, m)
    }

    #[inline(always)]
    fn row_max(row: &[f32]) -> f32 {
        row_max(row)
    }
}

/// Separate multiply and add: the portable path.
pub(crate) struct Plain;

impl Arith for Plain {
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Lanes used for reductions: wide enough for one AVX register.
const LANES: usize = 8;

/// `e^r` on `|r| <= ln 2 / 2`, highest degree first: the minimax fit of `scripts/exp_poly.py`
/// (worst relative error of the whole exp in f32: 1.5 epsilon). Six coefficients, five FMAs; the
/// constant is exactly 1, so `e^0 = 1` exactly.
#[allow(clippy::excessive_precision)] // as the script prints them
pub(crate) const EXP_POLY: [f32; 6] = [0.008_288_594_894_111_156, 0.041_907_232_254_743_576, 0.166_677_162_051_200_87, 0.499_990_791_082_382_2, 0.999_999_642_372_131_3, 1.0];
/// The two-step ln 2 of the range reduction (Cody and Waite): `LN2_HI` has few enough bits that
/// `n · LN2_HI` is exact.
pub(crate) const LN2_HI: f32 = 0.693_359_4;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Below this `e^x` is under f32's smallest normal and the exps return 0; above `EXP_HI` the
/// input is clamped to it (`e^EXP_HI` ≈ 2.4e38, finite). Scores and features stay far below.
pub(crate) const EXP_LO: f32 = -87.336_54;
pub(crate) const EXP_HI: f32 = 88.376_26;
/// `1.5 · 2^23`. Added to a float under 2^22 in magnitude, it leaves that float rounded to the
/// nearest integer (ties to even) in the low mantissa bits of the sum: one addition (fused into
/// the multiply by log2 e) and one subtraction round where `roundps` takes two µops and `cvtps`
/// a third to get the integer back.
pub(crate) const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// `e^x`, under 2 ulp for x in [-87.3, 88.3]; exactly 0 below (so masked `-inf` scores vanish).
#[inline(always)]
pub(crate) fn exp<A: Arith + ?Sized>(x: f32) -> f32 {
    let xc = x.clamp(EXP_LO, EXP_HI);
    let n = A::fma(xc, std::f32::consts::LOG2_E, 0.5).floor();
    let r = A::fma(n, -LN2_LO, A::fma(n, -LN2_HI, xc));
    let y = EXP_POLY[1..].iter().fold(EXP_POLY[0], |p, &c| A::fma(p, r, c));
    let scale = pow2(n);
    if x < EXP_LO {
        0.0
    } else {
        y * scale
    }
}

/// `2^n` for an integral `n` in [-126, 128] (128 gives inf), built from the bits of
/// `n + 1.5 · 2^23`, whose low mantissa bits hold `n`: integer lane arithmetic, where `n as i32`
/// (a saturating, NaN-checking conversion) made LLVM leave every lane of the exp's vector loop
/// to a scalar `cvttss2si` and compare.
#[inline(always)]
pub(crate) fn pow2(n: f32) -> f32 {
    let biased = (n + ROUNDING_MAGIC).to_bits().wrapping_sub(ROUNDING_MAGIC.to_bits()).wrapping_add(127);
    f32::from_bits(biased << 23)
}

/// Maximum of a row (`-inf` for an empty or fully masked row).
#[inline(always)]
pub(crate) fn row_max(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// `Σ a·b` over the shorter of the two, in [`LANES`] interleaved partial sums: one chain of adds
/// would wait on each add's latency.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a[..len].chunks_exact(LANES), b[..len].chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Replaces each `x` of the row by `e^(x - m)` and returns their sum.
#[inline(always)]
pub(crate) fn exp_shift_sum_scalar<A: Arith + ?Sized>(row: &mut [f32], m: f32) -> f32 {
    for x in row.iter_mut() {
        *x = exp::<A>(*x - m);
    }
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

/// `row *= s`.
#[inline(always)]
pub(crate) fn scale_row(row: &mut [f32], s: f32) {
    for x in row.iter_mut() {
        *x *= s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_to_a_few_ulp() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp::<Plain>(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "worst relative error {worst}");
        assert_eq!(exp::<Plain>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp::<Plain>(-100.0), 0.0);
        assert_eq!(exp::<Plain>(0.0), 1.0);
    }

    #[test]
    fn pow2_is_exact_over_the_exps_range_and_exp_keeps_its_edges() {
        for n in -126..=127 {
            assert_eq!(pow2(n as f32), 2f32.powi(n), "2^{n}");
        }
        assert_eq!(pow2(128.0), f32::INFINITY);
        assert!(exp::<Plain>(f32::NAN).is_nan());
        assert_eq!(exp::<Plain>(f32::INFINITY), exp::<Plain>(EXP_HI));
        assert!(exp::<Plain>(EXP_HI).is_finite());
        assert_eq!(exp::<Plain>(EXP_LO), EXP_LO.exp());
    }

    #[test]
    fn reductions_cover_tails() {
        let row: Vec<f32> = (0..19).map(|i| (i as f32 * 0.7).sin()).collect();
        let want_dot: f32 = row.iter().map(|x| x * x).sum();
        assert!((dot(&row, &row) - want_dot).abs() < 1e-5);
        assert_eq!(dot(&row[..3], &row), row[..3].iter().map(|x| x * x).sum::<f32>());
        let want = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(row_max(&row), want);
        assert_eq!(row_max(&[]), f32::NEG_INFINITY);
        let mut r = row.clone();
        let s = exp_shift_sum_scalar::<Plain>(&mut r, want);
        let want_sum: f32 = row.iter().map(|x| (x - want).exp()).sum();
        assert!((s - want_sum).abs() < 1e-5);
    }
}
