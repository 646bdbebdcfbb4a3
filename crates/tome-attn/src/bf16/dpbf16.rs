//! The AVX512-BF16 tile: `MR` rows by `NR` panels of 16 columns, every accumulator a register,
//! one `vdpbf16ps` per (row, panel, input pair).

use std::arch::x86_64::*;

use super::packed::PANEL;
use super::MR;

/// Accumulates rows `x` (`MR` rows of `pairs` bf16 pairs) times panels `w` (`NR` panels of
/// `pairs × 16` lanes, one after another) into `tile` (`MR` rows of `16 · NR` f32), which it
/// overwrites.
///
/// # Safety
/// The CPU has AVX512F and AVX512-BF16; `x` holds `MR · pairs` lanes and `w` `NR · pairs · 16`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn tile<const NR: usize>(x: &[u32], w: &[u32], pairs: usize, tile: &mut [f32]) {
    debug_assert!(x.len() >= MR * pairs && w.len() >= NR * pairs * PANEL && tile.len() >= MR * NR * PANEL);
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let (x, w) = (x.as_ptr(), w.as_ptr());
    for q in 0..pairs {
        // SAFETY: panel j's lanes for pair q lie within the `NR · pairs · 16` of `w`.
        let b: [__m512bh; NR] = std::array::from_fn(|j| unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w.add((j * pairs + q) * PANEL).cast())) });
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r's pair q lies within the `MR · pairs` of `x`.
            let a = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*x.add(r * pairs + q) as i32)) };
            for (acc, &b) in acc.iter_mut().zip(&b) {
                *acc = _mm512_dpbf16_ps(*acc, a, b);
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
