//! The portable tile: the AVX512-BF16 tile's arithmetic in scalar f32, in its order (per lane,
//! the odd element's product is added before the even one's, each sum rounded, subnormal sums
//! flushed to zero), so both give the same bits on the same inputs.

use super::convert::from_bf16_bits;
use super::packed::PANEL;
use super::MR;

/// As the AVX512-BF16 `tile`, on any CPU.
pub(super) fn tile<const NR: usize>(x: &[u32], w: &[u32], pairs: usize, stride: usize, tile: &mut [f32]) {
    let tile = &mut tile[..MR * NR * PANEL];
    tile.fill(0.0);
    for q in 0..pairs {
        for (r, acc) in tile.chunks_exact_mut(NR * PANEL).enumerate() {
            let a = x[r * stride + q];
            let (a_lo, a_hi) = (from_bf16_bits(a as u16), from_bf16_bits((a >> 16) as u16));
            for (j, acc) in acc.chunks_exact_mut(PANEL).enumerate() {
                let lanes = &w[(j * stride + q) * PANEL..][..PANEL];
                for (acc, &b) in acc.iter_mut().zip(lanes) {
                    let (b_lo, b_hi) = (from_bf16_bits(b as u16), from_bf16_bits((b >> 16) as u16));
                    // Products of two bf16 values are exact in f32; only the sums round.
                    *acc = flush(flush(*acc + a_hi * b_hi) + a_lo * b_lo);
                }
            }
        }
    }
}

/// Zero of the same sign for a subnormal, as `vdpbf16ps` writes them.
#[inline(always)]
fn flush(v: f32) -> f32 {
    if v.is_subnormal() {
        0.0_f32.copysign(v)
    } else {
        v
    }
}
