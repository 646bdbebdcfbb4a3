//! The AVX512-BF16 tile: `MR` rows by `NR` panels of 16 columns, every accumulator a register,
//! one `vdpbf16ps` per (row, panel, input pair).

use std::arch::x86_64::*;

use super::packed::PANEL;
use super::MR;

/// Accumulates rows `x` (`MR` rows of `pairs` bf16 pairs, `stride` lanes apart) times panels
/// `w` (`NR` panels of `pairs × 16` lanes, `stride × 16` apart) into `tile` (`MR` rows of
/// `16 · NR` f32), which it overwrites.
///
/// # Safety
/// The CPU has AVX512F and AVX512-BF16; `pairs ≤ stride`, `x` holds `MR · stride` lanes and `w`
/// `NR · stride · 16`.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn tile<const NR: usize>(x: &[u32], w: &[u32], pairs: usize, stride: usize, tile: &mut [f32]) {
    debug_assert!(pairs <= stride && x.len() >= MR * stride && w.len() >= NR * stride * PANEL && tile.len() >= MR * NR * PANEL);
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let (x, w) = (x.as_ptr(), w.as_ptr());
    for q in 0..pairs {
        // SAFETY: panel j's lanes for pair q lie within the `NR · stride · 16` of `w`.
        let b: [__m512bh; NR] = std::array::from_fn(|j| unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w.add((j * stride + q) * PANEL).cast())) });
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r's pair q lies within the `MR · stride` of `x`.
            let a = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*x.add(r * stride + q) as i32)) };
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
