//! The AVX-512 FMA tile: the same products as the `vdpbf16ps` tile, in its order, from f32
//! fused multiply-adds. A product of two bf16 values is exact in f32, so `fma(a, b, acc)` rounds
//! once, as the dot-product instruction's sum does: both tiles give the same bits (up to the
//! instruction's flushing of subnormal sums). Where `vdpbf16ps` runs at half the FMA rate, this
//! tile is the faster.

use std::arch::x86_64::*;

use super::packed::PANEL;
use super::MR;

/// Accumulates rows `x` (`MR` rows of `pairs` input pairs, each pair two f32 of bf16 value, the
/// even input first, rows `2 · stride` values apart) times panels `w` (as the `vdpbf16ps` tile
/// reads them) into `tile` (`MR` rows of `16 · NR` f32), which it overwrites.
///
/// # Safety
/// The CPU has AVX512F; `pairs ≤ stride`, `x` holds `MR · 2 · stride` values and `w`
/// `NR · stride · 16` lanes.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn tile<const NR: usize>(x: &[f32], w: &[u32], pairs: usize, stride: usize, tile: &mut [f32]) {
    debug_assert!(pairs <= stride && x.len() >= MR * 2 * stride && w.len() >= NR * stride * PANEL && tile.len() >= MR * NR * PANEL);
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let (x, w) = (x.as_ptr(), w.as_ptr());
    let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    for q in 0..pairs {
        // SAFETY: panel j's lanes for pair q lie within the `NR · stride · 16` of `w`.
        let lanes: [__m512i; NR] = std::array::from_fn(|j| unsafe { _mm512_loadu_si512(w.add((j * stride + q) * PANEL).cast()) });
        // The odd input's products first, then the even one's: the order `vdpbf16ps` sums in.
        let odd = lanes.map(|l| _mm512_castsi512_ps(_mm512_and_si512(l, high)));
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r's pair q lies within the `MR · 2 · stride` of `x`.
            let a = _mm512_set1_ps(unsafe { *x.add((r * stride + q) * 2 + 1) });
            for (acc, &b) in acc.iter_mut().zip(&odd) {
                *acc = _mm512_fmadd_ps(a, b, *acc);
            }
        }
        let even = lanes.map(|l| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(l)));
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let a = _mm512_set1_ps(unsafe { *x.add((r * stride + q) * 2) });
            for (acc, &b) in acc.iter_mut().zip(&even) {
                *acc = _mm512_fmadd_ps(a, b, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (j, &acc) in acc.iter().enumerate() {
            // SAFETY: the tile holds `MR` rows of `NR · 16`.
            unsafe { _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR * PANEL + j * PANEL), acc) };
        }
    }
}
