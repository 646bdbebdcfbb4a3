//! Blockwise attention with an online softmax (FlashAttention's tiling, Dao et al. 2022, on the
//! CPU): queries in tiles of `BQ`, keys in tiles of `BK`, a running (max, sum, output) per query,
//! so no score matrix larger than `BQ × BK` ever exists.
//!
//! Positions drive everything: the key range a query tile can see is found by binary search on
//! the (sorted) key positions, so windowed attention costs O(n·w) and causal attention skips
//! the blocks above the diagonal; a tile whose every pair is visible skips per-element masking.
//!
//! Where the CPU has AVX2 and FMA the tile is computed transposed (`Sᵀ = K Qᵀ`, keys × queries)
//! on register-blocked micro-kernels that read key and value rows in place, so only `Qᵀ` is
//! packed, once per tile: 6 × 16 in `avx2`, 12 × 32 in `avx512` where the CPU has AVX-512F. The
//! portable path packs `Qᵀ` panels, `Kᵀ` and `V` per key block for `MR × NR` kernels. Work is
//! split over (head, query tile) with rayon.
//!
//! Two things keep the vector tile fed: its scratch (`Qᵀ`, scores, accumulators) starts on a
//! cache line (`aligned`), so no register load straddles two lines, and while a key block
//! computes, each strip asks for its share of the next block's key and value lines, so that a
//! head's keys and values larger than L2 (16k tokens: 8 MB) arrive before the first strip
//! needs them.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::aligned::LineAligned;
#[cfg(target_arch = "x86_64")]
use crate::bf16::Bf16Kernel;
use crate::error::{shape_err, AttnError, Result};
use crate::mask::Mask;
use crate::partial::Partial;
use crate::precision::Precision;
use crate::simd::{self, Arith, Plain};
use crate::tensor::{dims3, with_f32};

/// Query rows per tile (portable path).
const BQ: usize = 64;
/// Query rows per tile of the vector paths (multiples of their 16- and 32-query micro-kernels): taller tiles
/// read each key and value row fewer times; under a window, shorter ones see fewer keys
/// (a tile sees its own rows plus the window on either side).
const TQ: usize = 192;
const TQ_WINDOW: usize = 96;
/// Key rows per block of the vector paths (a multiple of their 6- and 12-key micro-kernels).
const TK: usize = 72;
/// Key rows per tile.
const BK: usize = 64;
/// Micro-kernel rows (queries).
const MR: usize = 4;
/// Micro-kernel columns (keys for QKᵀ, head-dim lanes for PV).
const NR: usize = 16;

const OP: &str = "attention";

/// Attention of `q` (`[heads, nq, d]`) over `k`, `v` (`[kv_heads, nk, d]`, `[kv_heads, nk, dv]`)
/// under `mask`, scores scaled by `scale`. Query head `h` reads key/value head
/// `h / (heads / kv_heads)` (grouped-query attention when `kv_heads < heads`).
///
/// Returns the mergeable partial: rows that see no key have output 0 and lse `-inf`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32) -> Result<Partial> {
    check(q, k, v, mask)?;
    attention_on(q, k, v, mask, scale, Isa::detect())
}

/// [`attention`] in a job's precision. In [`Precision::Bf16`], where the CPU's bf16 products
/// run on AMX tiles, the scores and the weighted values do too (queries, keys and values taken
/// as bf16; scores, softmax statistics and the partial in f32; the probabilities as three bf16
/// terms: `bf16::attention`); elsewhere, and in f32, the f32 kernels run on the values given
/// (a bf16 run's are bf16 values already).
pub fn attention_in(precision: Precision, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32) -> Result<Partial> {
    check(q, k, v, mask)?;
    #[cfg(target_arch = "x86_64")]
    if precision == Precision::Bf16 && Bf16Kernel::detect() == Bf16Kernel::Amx {
        // SAFETY: the AMX kernel is chosen only where `amx::usable` holds.
        return crate::bf16::attention::attention_on(q, k, v, mask, scale, &unsafe { crate::bf16::attention::OnAmx::new() });
    }
    #[cfg(all(feature = "tile-model", target_arch = "x86_64"))]
    if precision == Precision::Bf16 && Bf16Kernel::detect() == Bf16Kernel::AmxModel {
        return crate::bf16::attention::attention_on(q, k, v, mask, scale, &crate::bf16::attention::OnModel);
    }
    let _ = precision;
    attention_on(q, k, v, mask, scale, Isa::detect())
}

/// The shapes fit together and the mask, and the key positions ascend.
fn check(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>) -> Result<()> {
    let (hq, nq, dqk) = dims3(q, OP, "q")?;
    let (hk, nk, dk) = dims3(k, OP, "k")?;
    let (hv, nv, _) = dims3(v, OP, "v")?;
    if hk != hv || nk != nv || dk != dqk {
        return Err(shape_err(OP, format!("q {:?}, k {:?}, v {:?} do not fit together", q.dims(), k.dims(), v.dims())));
    }
    if hk == 0 || hq % hk != 0 {
        return Err(shape_err(OP, format!("{hq} query heads cannot share {hk} key/value heads")));
    }
    if mask.q_pos.len() != nq || mask.k_pos.len() != nk || mask.key_valid.is_some_and(|m| m.len() != nk) {
        return Err(shape_err(
            OP,
            format!(
                "mask covers {} queries and {} keys ({} validity flags) but the tensors have {nq} and {nk}",
                mask.q_pos.len(),
                mask.k_pos.len(),
                mask.key_valid.map_or(nk, |m| m.len())
            ),
        ));
    }
    if let Some(at) = mask.k_pos.windows(2).position(|w| w[1] < w[0]) {
        return Err(AttnError::UnsortedKeys { op: OP, at: at + 1, got: mask.k_pos[at + 1], prev: mask.k_pos[at] });
    }
    Ok(())
}

/// The instruction set a tile runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Isa {
    Portable,
    /// AVX2 + FMA, 8 lanes.
    Avx2,
    /// AVX-512F, 16 lanes.
    Avx512,
}

impl Isa {
    /// The widest the CPU has (checked once per call; the check is a cached load).
    fn detect() -> Isa {
        Isa::available().last().copied().unwrap_or(Isa::Portable)
    }

    /// Every path this CPU can run, narrowest first.
    fn available() -> Vec<Isa> {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }
}

/// [`attention`] on the instruction set chosen by the caller (one the CPU has).
fn attention_on(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32, isa: Isa) -> Result<Partial> {
    let (hq, nq, dqk) = dims3(q, OP, "q")?;
    let (hk, nk, _) = dims3(k, OP, "k")?;
    let (_, _, dv) = dims3(v, OP, "v")?;
    if nq == 0 || dv == 0 {
        return Partial::empty(hq, nq, dv);
    }
    let mut out = vec![0f32; hq * nq * dv];
    let mut lse = vec![f32::NEG_INFINITY; hq * nq];
    with_f32(q, OP, |q| {
        with_f32(k, OP, |k| {
            with_f32(v, OP, |v| {
                let p = Problem { q, k, v, nq, nk, dqk, dv, group: hq / hk, mask, scale };
                let bq = match (isa, mask.window) {
                    (Isa::Portable, _) => BQ,
                    (_, None) => TQ,
                    (_, Some(_)) => TQ_WINDOW,
                };
                let heads = out.par_chunks_mut(nq * dv).zip(lse.par_chunks_mut(nq));
                heads.enumerate().try_for_each(|(h, (out, lse))| {
                    let tiles = out.par_chunks_mut(bq * dv).zip(lse.par_chunks_mut(bq));
                    tiles.enumerate().try_for_each(|(t, (out, lse))| p.tile(isa, h, t * bq, out, lse))
                })
            })
        })
    })????;
    Partial::from_vecs(out, lse, hq, nq, dv)
}

/// The vector kernels of a transposed tile, one implementation per instruction set.
#[cfg(target_arch = "x86_64")]
trait TransposedKernels {
    /// Queries per micro-kernel: `rows_p` is padded to a multiple.
    const NQ: usize;
    /// A broken precondition (lengths, lane multiple) is an error, never a silent return.
    ///
    /// # Safety
    /// The CPU has the kernels' instruction set.
    unsafe fn scores_t(qt: &[f32], k: &[f32], st: &mut [f32], cols: usize, dqk: usize, rows_p: usize) -> Result<()>;
    /// # Safety
    /// As `scores_t`.
    unsafe fn softmax_t(st: &mut [f32], cols: usize, rows_p: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) -> Result<()>;
    /// # Safety
    /// As `scores_t`.
    unsafe fn values_t(pt: &[f32], v: &[f32], acc: &mut [f32], cols: usize, dv: usize, rows_p: usize) -> Result<()>;
}

#[cfg(target_arch = "x86_64")]
struct Avx2Kernels;

#[cfg(target_arch = "x86_64")]
impl TransposedKernels for Avx2Kernels {
    const NQ: usize = crate::avx2::NQ;
    unsafe fn scores_t(qt: &[f32], k: &[f32], st: &mut [f32], cols: usize, dqk: usize, rows_p: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { crate::avx2::scores_t(qt, k, st, cols, dqk, rows_p) }
    }
    unsafe fn softmax_t(st: &mut [f32], cols: usize, rows_p: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { crate::avx2::softmax_t(st, cols, rows_p, m, l, acc, dv) }
    }
    unsafe fn values_t(pt: &[f32], v: &[f32], acc: &mut [f32], cols: usize, dv: usize, rows_p: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { crate::avx2::values_t(pt, v, acc, cols, dv, rows_p) }
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512Kernels;

#[cfg(target_arch = "x86_64")]
impl TransposedKernels for Avx512Kernels {
    const NQ: usize = crate::avx512::NQ;
    unsafe fn scores_t(qt: &[f32], k: &[f32], st: &mut [f32], cols: usize, dqk: usize, rows_p: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { crate::avx512::scores_t(qt, k, st, cols, dqk, rows_p) }
    }
    unsafe fn softmax_t(st: &mut [f32], cols: usize, rows_p: usize, m: &mut [f32], l: &mut [f32], acc: &mut [f32], dv: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { crate::avx512::softmax_t(st, cols, rows_p, m, l, acc, dv) }
    }
    unsafe fn values_t(pt: &[f32], v: &[f32], acc: &mut [f32], cols: usize, dv: usize, rows_p: usize) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { crate::avx512::values_t(pt, v, acc, cols, dv, rows_p) }
    }
}

/// One attention call's inputs, shared by every tile.
struct Problem<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    nq: usize,
    nk: usize,
    dqk: usize,
    dv: usize,
    /// Query heads per key/value head.
    group: usize,
    mask: &'a Mask<'a>,
    scale: f32,
}

impl Problem<'_> {
    fn tile(&self, isa: Isa, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]) -> Result<()> {
        match isa {
            // SAFETY: `Isa::available` offers these only where the CPU reports them.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.tile_avx2(h, q0, out, lse) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.tile_avx512(h, q0, out, lse) },
            _ => {
                self.tile_with::<Plain>(h, q0, out, lse);
                Ok(())
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_avx2(&self, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]) -> Result<()> {
        // SAFETY: compiled for, and called only on, CPUs with AVX2 and FMA.
        unsafe { self.tile_transposed::<Avx2Kernels>(h, q0, out, lse) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512(&self, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]) -> Result<()> {
        // SAFETY: compiled for, and called only on, CPUs with AVX-512F.
        unsafe { self.tile_transposed::<Avx512Kernels>(h, q0, out, lse) }
    }

    /// The position range of a tile's queries and the keys `start..end` any of them may see.
    fn tile_keys(&self, q_pos: &[i64]) -> ((i64, i64), usize, usize) {
        let q_min = q_pos.iter().copied().min().unwrap_or(0);
        let q_max = q_pos.iter().copied().max().unwrap_or(0);
        let (lo, hi) = self.mask.key_position_bounds(q_min, q_max);
        ((q_min, q_max), self.mask.k_pos.partition_point(|&p| p < lo), self.mask.k_pos.partition_point(|&p| p < hi))
    }

    /// Keys `kb..kb + cols` for queries in `q_range`: `None` when none is valid, else their
    /// validity and whether any (query, key) pair of the block needs masking.
    fn key_block(&self, q_range: (i64, i64), kb: usize, cols: usize) -> Option<(Option<&[bool]>, bool)> {
        let valid = self.mask.key_valid.map(|v| &v[kb..kb + cols]);
        if valid.is_some_and(|v| !v.contains(&true)) {
            return None;
        }
        let all_valid = valid.is_none_or(|v| !v.contains(&false));
        let k_range = (self.mask.k_pos[kb], self.mask.k_pos[kb + cols - 1]);
        Some((valid, !all_valid || !self.mask.positions_all_visible(q_range, k_range)))
    }

    /// The vector tile, transposed: scores are kept as `Sᵀ` (keys × queries), so the key and
    /// value rows are read in place — nothing is packed per key block — while each micro-kernel
    /// broadcasts keys (or value columns) against `K::NQ` queries in two registers.
    ///
    /// The tile is walked one strip of `K::NQ` queries at a time inside each key block: a strip
    /// computes its scores, runs the online softmax down their columns and adds its weighted
    /// values before the next strip starts, so its scores, its slice of `Qᵀ` and its
    /// accumulator stay in L1 next to the key and value block that every strip of the tile
    /// shares. A strip works only on the keys of the block its queries can see (a window's
    /// edges, a causal diagonal) and masks only where some of its queries cannot. Inlined into
    /// each instruction set's `#[target_feature]` wrapper.
    ///
    /// # Safety
    /// The CPU has `K`'s instruction set.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn tile_transposed<K: TransposedKernels>(&self, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]) -> Result<()> {
        const { assert!(TQ.is_multiple_of(K::NQ) && TQ_WINDOW.is_multiple_of(K::NQ)) };
        let nq = K::NQ;
        let (dqk, dv, mask) = (self.dqk, self.dv, self.mask);
        let rows = lse.len();
        let q_pos = &mask.q_pos[q0..q0 + rows];
        let (q_range, k_start, k_end) = self.tile_keys(q_pos);
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        if k_start >= k_end {
            return Ok(());
        }
        let kvh = h / self.group;
        let strips = rows.div_ceil(nq);
        // Per strip s: its queries' positions, their range, Qᵀ pre-multiplied by the score
        // scale (element (t, r) at (s * dqk + t) * nq + r), the accumulator Oᵀ (element (c, r)
        // at (s * dv + c) * nq + r), and the running max and sum of each query.
        let strip_pos: Vec<&[i64]> = q_pos.chunks(nq).collect();
        let strip_range: Vec<(i64, i64)> = strip_pos.iter().map(|p| p.iter().fold((i64::MAX, i64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)))).collect();
        let mut qt = LineAligned::filled(strips * dqk * nq, 0.0);
        let q_head = &self.q[(h * self.nq + q0) * dqk..];
        for r in 0..rows {
            let (s, lane) = (r / nq, r % nq);
            for (t, &x) in q_head[r * dqk..(r + 1) * dqk].iter().enumerate() {
                qt[(s * dqk + t) * nq + lane] = x * self.scale;
            }
        }
        let mut acc = LineAligned::filled(strips * dv * nq, 0.0);
        let mut m = LineAligned::filled(strips * nq, f32::NEG_INFINITY);
        let mut l = LineAligned::filled(strips * nq, 0.0);
        let mut st = LineAligned::filled(TK * nq, 0.0);
        let k_head = &self.k[kvh * self.nk * dqk..(kvh + 1) * self.nk * dqk];
        let v_head = &self.v[kvh * self.nk * dv..(kvh + 1) * self.nk * dv];

        for kb in (k_start..k_end).step_by(TK) {
            let cols = TK.min(k_end - kb);
            let Some((valid, needs_mask)) = self.key_block(q_range, kb, cols) else { continue };
            let (k_block, v_block) = (&k_head[kb * dqk..(kb + cols) * dqk], &v_head[kb * dv..(kb + cols) * dv]);
            let block_pos = &mask.k_pos[kb..kb + cols];
            let next = (kb + cols)..(kb + cols + TK).min(k_end);
            let (next_k, next_v) = (&k_head[next.start * dqk..next.end * dqk], &v_head[next.start * dv..next.end * dv]);
            for (s, (&pos, &range)) in strip_pos.iter().zip(&strip_range).enumerate() {
                prefetch_share(next_k, s, strips);
                prefetch_share(next_v, s, strips);
                // Only the block's keys this strip can see: the rest would add exact zeros.
                let (lo, hi) = mask.key_position_bounds(range.0, range.1);
                let (j0, j1) = (block_pos.partition_point(|&p| p < lo), block_pos.partition_point(|&p| p < hi));
                if j0 >= j1 {
                    continue;
                }
                let n_keys = j1 - j0;
                let valid = valid.map(|v| &v[j0..j1]);
                let (m, l) = (&mut m[s * nq..(s + 1) * nq], &mut l[s * nq..(s + 1) * nq]);
                let acc = &mut acc[s * dv * nq..(s + 1) * dv * nq];
                // SAFETY: the caller's contract.
                unsafe { K::scores_t(&qt[s * dqk * nq..(s + 1) * dqk * nq], &k_block[j0 * dqk..j1 * dqk], &mut st, n_keys, dqk, nq)? };
                let k_range = (block_pos[j0], block_pos[j1 - 1]);
                if needs_mask && (valid.is_some_and(|v| v.contains(&false)) || !mask.positions_all_visible(range, k_range)) {
                    mask_strip(mask, &mut st, kb + j0, n_keys, valid, pos, range, nq);
                }
                // SAFETY: as above.
                unsafe {
                    K::softmax_t(&mut st, n_keys, nq, m, l, acc, dv)?;
                    K::values_t(&st, &v_block[j0 * dv..j1 * dv], acc, n_keys, dv, nq)?;
                }
            }
        }

        for r in 0..rows {
            let (s, lane) = (r / nq, r % nq);
            let l = l[r];
            if l > 0.0 {
                let inv = 1.0 / l;
                for (c, o) in out[r * dv..(r + 1) * dv].iter_mut().enumerate() {
                    *o = acc[(s * dv + c) * nq + lane] * inv;
                }
                lse[r] = m[r] + l.ln();
            }
        }
        Ok(())
    }

    /// Attention of query rows `q0..q0 + lse.len()` of head `h`, written into `out`/`lse`.
    #[inline(always)]
    fn tile_with<A: Arith>(&self, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]) {
        let (dqk, dv, mask) = (self.dqk, self.dv, self.mask);
        let rows = lse.len();
        let q_pos = &mask.q_pos[q0..q0 + rows];
        let (q_range, k_start, k_end) = self.tile_keys(q_pos);
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        if k_start >= k_end {
            return;
        }

        let kvh = h / self.group;
        let rows_p = rows.div_ceil(MR) * MR;
        let dv_p = dv.div_ceil(NR) * NR;
        // Query tile packed as MR-row panels, element (t, r) of panel p at p*dqk*MR + t*MR + r,
        // pre-multiplied by the score scale.
        let mut q_panels = vec![0f32; rows_p * dqk];
        let q_head = &self.q[(h * self.nq + q0) * dqk..];
        for r in 0..rows {
            let (panel, lane) = (r / MR, r % MR);
            for (t, &x) in q_head[r * dqk..(r + 1) * dqk].iter().enumerate() {
                q_panels[panel * dqk * MR + t * MR + lane] = x * self.scale;
            }
        }
        let mut kt = vec![0f32; dqk * BK];
        let mut vt = vec![0f32; BK * dv_p];
        let mut s = vec![0f32; rows_p * BK];
        let mut acc = vec![0f32; rows_p * dv_p];
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0f32; rows];
        let k_head = &self.k[kvh * self.nk * dqk..(kvh + 1) * self.nk * dqk];
        let v_head = &self.v[kvh * self.nk * dv..(kvh + 1) * self.nk * dv];

        for kb in (k_start..k_end).step_by(BK) {
            let cols = BK.min(k_end - kb);
            let Some((_, needs_mask)) = self.key_block(q_range, kb, cols) else { continue };

            if cols < BK {
                kt.fill(0.0);
                vt.fill(0.0);
            }
            for j in 0..cols {
                let key = &k_head[(kb + j) * dqk..(kb + j + 1) * dqk];
                for (t, &x) in key.iter().enumerate() {
                    kt[t * BK + j] = x;
                }
                vt[j * dv_p..j * dv_p + dv].copy_from_slice(&v_head[(kb + j) * dv..(kb + j + 1) * dv]);
            }

            scores::<A>(&q_panels, &kt, &mut s, rows_p, dqk);

            for r in 0..rows {
                let row = &mut s[r * BK..(r + 1) * BK];
                row[cols..].fill(f32::NEG_INFINITY);
                if needs_mask {
                    for (j, x) in row[..cols].iter_mut().enumerate() {
                        if !mask.allows(q0 + r, kb + j) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                let block_max = A::row_max(row);
                if block_max == f32::NEG_INFINITY {
                    row.fill(0.0);
                    continue;
                }
                let m_new = m[r].max(block_max);
                let sum = A::exp_shift_sum(row, m_new);
                if m[r] != m_new {
                    let correction = simd::exp::<A>(m[r] - m_new);
                    l[r] *= correction;
                    simd::scale_row(&mut acc[r * dv_p..(r + 1) * dv_p], correction);
                    m[r] = m_new;
                }
                l[r] += sum;
            }

            weighted_values::<A>(&s, &vt, &mut acc, rows_p, dv_p);
        }

        for r in 0..rows {
            if l[r] > 0.0 {
                let inv = 1.0 / l[r];
                for (o, &a) in out[r * dv..(r + 1) * dv].iter_mut().zip(&acc[r * dv_p..r * dv_p + dv]) {
                    *o = a * inv;
                }
                lse[r] = m[r] + l[r].ln();
            }
        }
    }
}

/// Asks for share `share` of `shares` of `data`'s cache lines to be brought into L2: the next
/// key block's rows, a share per strip, on their way while this block computes. At 16k tokens
/// a head's keys and values (8 MB) come from L3, and the first strip to touch a block would
/// otherwise wait on each of its lines.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_share(data: &[f32], share: usize, shares: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    let lines = data.len().div_ceil(16);
    let per_share = lines.div_ceil(shares.max(1));
    for line in (share * per_share..((share + 1) * per_share).min(lines)).map(|l| l * 16) {
        // SAFETY: `line < data.len()`, so the address is inside `data`; a prefetch reads nothing
        // the program sees and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(data.as_ptr().add(line).cast()) }
    }
}

/// Sets to `-inf` the scores of a strip (`st`: keys `kb..kb + cols` × queries at positions
/// `q_pos`, spanning `q_range`, `stride` apart) that `mask` hides. Inlined into the tile, and
/// so into its instruction set's `#[target_feature]` wrapper: the position compares are 64-bit,
/// which the baseline x86-64 target cannot do in vector registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn mask_strip(mask: &Mask<'_>, st: &mut [f32], kb: usize, cols: usize, valid: Option<&[bool]>, q_pos: &[i64], q_range: (i64, i64), stride: usize) {
    for (j, row) in st.chunks_exact_mut(stride).take(cols).enumerate() {
        if valid.is_some_and(|v| !v[j]) {
            row.fill(f32::NEG_INFINITY);
            continue;
        }
        // The queries that see key j: positions in [lo, hi] (`Mask::allows`, with validity
        // settled above). Most keys are seen by the whole strip; the rest are compared
        // branch-free so the loop vectorises.
        let (lo, hi) = mask.query_position_bounds(mask.k_pos[kb + j]);
        if lo <= q_range.0 && q_range.1 <= hi {
            continue;
        }
        for (x, &qp) in row.iter_mut().zip(q_pos) {
            if qp < lo || qp > hi {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// `s[r][j] = Σ_t q[r][t] · kᵀ[t][j]` for a `rows_p × BK` tile, `MR × NR` accumulators at a time.
#[inline(always)]
fn scores<A: Arith>(q_panels: &[f32], kt: &[f32], s: &mut [f32], rows_p: usize, dqk: usize) {
    for (panel_idx, panel) in q_panels.chunks_exact(dqk * MR).enumerate().take(rows_p / MR) {
        for c0 in (0..BK).step_by(NR) {
            let mut acc = [[0f32; NR]; MR];
            for (qv, krow) in panel.chunks_exact(MR).zip(kt.chunks_exact(BK)) {
                let kv: &[f32; NR] = match krow[c0..c0 + NR].try_into() {
                    Ok(kv) => kv,
                    Err(_) => continue,
                };
                for r in 0..MR {
                    for c in 0..NR {
                        acc[r][c] = A::fma(qv[r], kv[c], acc[r][c]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let row = (panel_idx * MR + r) * BK;
                s[row + c0..row + c0 + NR].copy_from_slice(a);
            }
        }
    }
}

/// `acc[r][c] += Σ_j p[r][j] · v[j][c]` for a `rows_p × dv_p` tile.
#[inline(always)]
fn weighted_values<A: Arith>(p: &[f32], vt: &[f32], acc: &mut [f32], rows_p: usize, dv_p: usize) {
    for r0 in (0..rows_p).step_by(MR) {
        let prow: [&[f32]; MR] = std::array::from_fn(|r| &p[(r0 + r) * BK..(r0 + r + 1) * BK]);
        for c0 in (0..dv_p).step_by(NR) {
            let mut tile = [[0f32; NR]; MR];
            for (r, t) in tile.iter_mut().enumerate() {
                t.copy_from_slice(&acc[(r0 + r) * dv_p + c0..(r0 + r) * dv_p + c0 + NR]);
            }
            for (j, vrow) in vt.chunks_exact(dv_p).enumerate() {
                let vv: &[f32; NR] = match vrow[c0..c0 + NR].try_into() {
                    Ok(vv) => vv,
                    Err(_) => continue,
                };
                for r in 0..MR {
                    let pj = prow[r][j];
                    for c in 0..NR {
                        tile[r][c] = A::fma(pj, vv[c], tile[r][c]);
                    }
                }
            }
            for (r, t) in tile.iter().enumerate() {
                acc[(r0 + r) * dv_p + c0..(r0 + r) * dv_p + c0 + NR].copy_from_slice(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Times every path the CPU can run on a few shapes (dense, causal, windowed; head widths 64
    /// and 80, which exercise the kernels' narrower panels), on one thread, best of several runs
    /// (CPU time of the thread, and wall time):
    /// `cargo test -p tome-attn --lib time_vector_paths -- --ignored --nocapture`. A harness
    /// to compare two builds of the kernels side by side, not a test.
    #[test]
    #[ignore]
    fn time_vector_paths() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let reps: usize = 11;
        for &(n, d, causal, window) in &[(2048usize, 64usize, false, None), (2048, 64, true, None), (4096, 64, false, Some(128usize)), (2048, 80, true, None)] {
            let q = Tensor::randn(0f32, 1.0, (2, n, d), &Device::Cpu).unwrap();
            let k = Tensor::randn(0f32, 1.0, (2, n, d), &Device::Cpu).unwrap();
            let v = Tensor::randn(0f32, 1.0, (2, n, d), &Device::Cpu).unwrap();
            let pos: Vec<i64> = (0..n as i64).collect();
            let mask = Mask::full(&pos, &pos).with_causal(causal).with_window(window);
            for isa in Isa::available().into_iter().filter(|&i| i != Isa::Portable) {
                // CPU time of the pool's one thread as the kernel sees it (Linux schedstat: time
                // on a CPU), which other processes' load does not inflate the way it does wall time.
                let on_cpu = || std::fs::read_to_string("/proc/thread-self/schedstat").ok().and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
                let (mut wall, mut cpu) = (f64::INFINITY, f64::INFINITY);
                for _ in 0..reps {
                    let (w, c) = pool.install(|| {
                        let (t, c0) = (std::time::Instant::now(), on_cpu());
                        attention_on(&q, &k, &v, &mask, 0.125, isa).unwrap();
                        (t.elapsed().as_secs_f64(), on_cpu().zip(c0).map_or(f64::NAN, |(c1, c0)| (c1 - c0) as f64 * 1e-9))
                    });
                    wall = wall.min(w);
                    cpu = cpu.min(c);
                }
                println!("bench n={n} d={d} causal={causal} window={window:?} {isa:?}: {:.2} ms cpu {:.2} ms wall", cpu * 1e3, wall * 1e3);
            }
        }
    }

    /// Every path the CPU can run (portable, AVX2, AVX-512) against the reference.
    #[test]
    fn portable_and_vector_paths_agree() {
        // Causal, windowed, tiny, and a window over several tiles and key blocks with padding keys.
        for &(nq, nk, d, causal, window) in &[
            (70usize, 90usize, 12usize, true, None),
            (33, 140, 64, false, Some(17usize)),
            (5, 3, 33, false, None),
            (300, 260, 16, false, Some(40)),
            (400, 500, 32, true, Some(100)),
        ] {
            let q = Tensor::randn(0f32, 1.0, (2, nq, d), &Device::Cpu).unwrap();
            let k = Tensor::randn(0f32, 1.0, (2, nk, d), &Device::Cpu).unwrap();
            let v = Tensor::randn(0f32, 1.0, (2, nk, d), &Device::Cpu).unwrap();
            let q_pos: Vec<i64> = (10..10 + nq as i64).collect();
            let k_pos: Vec<i64> = (0..nk as i64).collect();
            // Every third key invalid in the last case: strips then mask inside their key range.
            let valid: Vec<bool> = (0..nk).map(|j| nq != 400 || j % 3 != 1).collect();
            let mask = Mask::full(&q_pos, &k_pos).with_causal(causal).with_window(window).with_key_valid(Some(&valid));
            let want = crate::reference::attention(&q, &k, &v, &mask, 0.3).unwrap();
            for isa in Isa::available() {
                let got = attention_on(&q, &k, &v, &mask, 0.3, isa).unwrap();
                let diff = (got.out - &want.out).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 2e-5, "{isa:?}: {diff}");
                let lse = (got.lse - &want.lse).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(lse < 2e-5, "{isa:?} lse: {lse}");
            }
        }
    }
}
