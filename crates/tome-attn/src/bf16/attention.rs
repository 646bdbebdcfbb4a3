//! Attention of a bf16 run on AMX tiles: `S = Q Kᵀ` and `O += P V` as `tdpbf16ps` tile products,
//! the online softmax between them in f32. Queries, keys and values enter as bf16 (a bf16 run
//! has rounded them so already); scores accumulate in f32 and are scaled in f32; the running
//! max and sum and the (out, lse) partial are f32. The probabilities enter the second product
//! as three bf16 terms, `p = p₁ + p₂ + p₃` with what is left under 2⁻²⁷ of `p` (each term the
//! rest rounded to bf16, each difference exact in f32), so the result lies within f32 rounding
//! of the f32 kernel's on the same inputs, not a bf16 rounding of `p` away.
//!
//! Keys and values are packed once per call, per key/value head, in blocks of 32 keys: the keys
//! as two panels of 16 (head-dimension pairs × keys: `Q Kᵀ`'s B operand), the values as panels
//! of 16 value columns (key pairs × columns: `P V`'s B operand). Work is split over (head, 128
//! queries); a task walks the key blocks its queries can see and, in each, its strips of 32
//! queries (one A-tile pair), skipping the blocks a strip cannot see and masking only the
//! blocks some of whose pairs it cannot.

use candle_core::Tensor;
use rayon::prelude::*;

use super::amx::{self, Tiles};
use super::convert::{pair, round_to_bf16, to_bf16_bits};
use super::packed::{PAIR_STEP, PANEL};
use crate::error::Result;
use crate::mask::Mask;
use crate::partial::Partial;
use crate::simd::{exp, exp_shift_sum_scalar, row_max, scale_row, Plain};
use crate::tensor::{dims3, with_f32};

/// Queries per strip: the A tiles' 32 rows.
const STRIP: usize = amx::ROWS;
/// Keys per block: two panels of 16, the C tiles' 32 columns.
const BLOCK: usize = amx::PANELS * PANEL;
/// Key pairs per block: one tile step of `P V`.
const BLOCK_PAIRS: usize = BLOCK / 2;
/// Queries per task.
const TASK: usize = 128;
/// bf16 terms the probabilities enter `P V` as: what three leave is under 2⁻²⁷ of `p`.
const TERMS: usize = 3;
const _: () = assert!(BLOCK_PAIRS == PAIR_STEP && TASK.is_multiple_of(STRIP));

/// One call's operands: `q` `[heads, nq, dqk]`, `k` `[kv_heads, nk, dqk]`, `v` `[kv_heads, nk,
/// dv]`, row-major.
pub(crate) struct Problem<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    heads: usize,
    kv_heads: usize,
    nq: usize,
    nk: usize,
    dqk: usize,
    dv: usize,
    mask: &'a Mask<'a>,
    scale: f32,
}

/// Every key/value head's keys and values in the tiles' operand layouts, in blocks of
/// [`BLOCK`] keys from `first_key` (a multiple of [`BLOCK`], so a key's block is the same
/// whatever queries share the call) to the last key any query of the call may see; the last
/// block padded with zero keys.
pub(crate) struct Packed {
    keys: Vec<u32>,
    values: Vec<u32>,
    first_key: usize,
    /// Head-dimension pairs per key: `dqk / 2` rounded up to whole tile steps.
    qk_stride: usize,
    /// Panels of 16 value columns.
    v_panels: usize,
    blocks: usize,
}

impl Packed {
    fn new(p: &Problem<'_>) -> Self {
        let qk_stride = p.dqk.div_ceil(2).next_multiple_of(PAIR_STEP);
        // The keys some query may see: windows and causal masks leave most of a long call's
        // keys to other calls' queries.
        let (q_min, q_max) = p.mask.q_pos.iter().fold((i64::MAX, i64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let (lo, hi) = p.mask.key_position_bounds(q_min, q_max);
        let (seen_from, seen_to) = (p.mask.k_pos.partition_point(|&k| k < lo), p.mask.k_pos.partition_point(|&k| k < hi));
        let first_key = seen_from / BLOCK * BLOCK;
        let (v_panels, blocks) = (p.dv.div_ceil(PANEL), seen_to.saturating_sub(first_key).div_ceil(BLOCK));
        let (key_block, value_block) = (Self::key_block_lanes(qk_stride), Self::value_block_lanes(v_panels));
        let mut keys = vec![0u32; p.kv_heads * blocks * key_block];
        let mut values = vec![0u32; p.kv_heads * blocks * value_block];
        if blocks > 0 {
            keys.par_chunks_mut(key_block).zip(values.par_chunks_mut(value_block)).enumerate().for_each(|(at, (keys, values))| {
                let (h, b) = (at / blocks, at % blocks);
                let start = first_key + b * BLOCK;
                for i in 0..BLOCK.min(seen_to - start) {
                    let row = h * p.nk + start + i;
                    // Key i: lane i % 16 of panel i / 16, one head-dimension pair per tile row.
                    let (panel, lane) = (i / PANEL, i % PANEL);
                    for (t, two) in p.k[row * p.dqk..(row + 1) * p.dqk].chunks(2).enumerate() {
                        keys[(panel * qk_stride + t) * PANEL + lane] = pair(two[0], two.get(1).copied().unwrap_or(0.0));
                    }
                    // Value i: the low (even i) or high (odd i) half of tile row i / 2, column c
                    // in lane c % 16 of panel c / 16. An invalid key's values stay zero: its
                    // probability is 0 for every query, and 0 · NaN would not be.
                    if p.mask.key_valid.is_some_and(|v| !v[start + i]) {
                        continue;
                    }
                    let shift = 16 * (i % 2);
                    for (c, &x) in p.v[row * p.dv..(row + 1) * p.dv].iter().enumerate() {
                        values[((c / PANEL) * BLOCK_PAIRS + i / 2) * PANEL + c % PANEL] |= (to_bf16_bits(x) as u32) << shift;
                    }
                }
            });
        }
        Packed { keys, values, first_key, qk_stride, v_panels, blocks }
    }

    fn key_block_lanes(qk_stride: usize) -> usize {
        amx::PANELS * qk_stride * PANEL
    }

    fn value_block_lanes(v_panels: usize) -> usize {
        v_panels * BLOCK_PAIRS * PANEL
    }

    /// The block key `key` lies in (`first_key ≤ key`).
    fn block_of(&self, key: usize) -> usize {
        (key - self.first_key) / BLOCK
    }

    /// Block `b`'s first key.
    fn block_start(&self, b: usize) -> usize {
        self.first_key + b * BLOCK
    }

    /// Block `b` of key/value head `h`'s keys: two panels.
    fn keys(&self, h: usize, b: usize) -> &[u32] {
        let lanes = Self::key_block_lanes(self.qk_stride);
        &self.keys[(h * self.blocks + b) * lanes..][..lanes]
    }

    /// Block `b` of key/value head `h`'s values: `v_panels` panels.
    fn values(&self, h: usize, b: usize) -> &[u32] {
        let lanes = Self::value_block_lanes(self.v_panels);
        &self.values[(h * self.blocks + b) * lanes..][..lanes]
    }
}

/// Attention of `q` (`[heads, nq, dqk]`) over `k`, `v` (`[kv_heads, nk, dqk]`, `[kv_heads, nk,
/// dv]`) under `mask`, the tile products on `runner`'s tiles. The caller has checked the
/// shapes against each other and the mask, and the key positions' order.
pub(crate) fn attention_on<R: TileRunner>(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask<'_>, scale: f32, runner: &R) -> Result<Partial> {
    const OP: &str = "bf16 attention";
    let (heads, nq, dqk) = dims3(q, OP, "q")?;
    let (kv_heads, nk, _) = dims3(k, OP, "k")?;
    let (_, _, dv) = dims3(v, OP, "v")?;
    if nq == 0 || dv == 0 {
        return Partial::empty(heads, nq, dv);
    }
    let mut out = vec![0f32; heads * nq * dv];
    let mut lse = vec![f32::NEG_INFINITY; heads * nq];
    with_f32(q, OP, |q| {
        with_f32(k, OP, |k| {
            with_f32(v, OP, |v| {
                let p = Problem { q, k, v, heads, kv_heads, nq, nk, dqk, dv, mask, scale };
                let packed = Packed::new(&p);
                let heads = out.par_chunks_mut(nq * dv).zip(lse.par_chunks_mut(nq));
                heads.enumerate().for_each(|(h, (out, lse))| {
                    let tasks = out.par_chunks_mut(TASK * dv).zip(lse.par_chunks_mut(TASK));
                    tasks.enumerate().for_each(|(t, (out, lse))| runner.run(&p, &packed, h, t * TASK, out, lse));
                });
            })
        })
    })???;
    Partial::from_vecs(out, lse, heads, nq, dv)
}

/// Where a task's tile products run.
pub(crate) trait TileRunner: Sync {
    /// [`task`] on these tiles.
    fn run(&self, p: &Problem<'_>, packed: &Packed, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]);
}

/// The AMX instructions, the tiles configured for each task.
pub(crate) struct OnAmx(());

impl OnAmx {
    /// # Safety
    /// [`amx::usable`] returned true (the CPU has AMX-BF16 and AVX-512F, the process the tile
    /// state).
    pub(crate) unsafe fn new() -> Self {
        OnAmx(())
    }
}

impl TileRunner for OnAmx {
    fn run(&self, p: &Problem<'_>, packed: &Packed, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]) {
        #[target_feature(enable = "avx512f")]
        fn vectorised(p: &Problem<'_>, packed: &Packed, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]) {
            // SAFETY: AMX is usable (`OnAmx::new`'s contract); the session configures this
            // thread's tiles for the task and releases them after it.
            unsafe {
                let _tiles = amx::Session::begin();
                task(&mut amx::Amx, p, packed, h, q0, out, lse);
            }
        }
        // SAFETY: the CPU has AVX-512F (`OnAmx::new`'s contract).
        unsafe { vectorised(p, packed, h, q0, out, lse) }
    }
}

/// One task: query rows `q0..q0 + lse.len()` of head `h`.
///
/// # Safety
/// The tiles `t` stands for are configured on this thread.
#[inline(always)]
unsafe fn task<T: Tiles>(t: &mut T, p: &Problem<'_>, packed: &Packed, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]) {
    let (mask, rows, qs) = (p.mask, lse.len(), packed.qk_stride);
    out.fill(0.0);
    lse.fill(f32::NEG_INFINITY);
    let kvh = h / (p.heads / p.kv_heads);
    let q_pos = &mask.q_pos[q0..q0 + rows];
    // Per strip: the keys its queries may see (`k_pos` is sorted) and their positions' range.
    let strips: Vec<(usize, usize, (i64, i64))> = q_pos
        .chunks(STRIP)
        .map(|pos| {
            let range = pos.iter().fold((i64::MAX, i64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            let (lo, hi) = mask.key_position_bounds(range.0, range.1);
            (mask.k_pos.partition_point(|&k| k < lo), mask.k_pos.partition_point(|&k| k < hi), range)
        })
        .collect();
    let first = strips.iter().map(|s| s.0).min().unwrap_or(0);
    let last = strips.iter().map(|s| s.1).max().unwrap_or(0);
    if first >= last {
        return;
    }
    // The queries as tile rows of bf16 pairs, `qs` apart, zero past the rows and the dimension.
    let mut xq = vec![0u32; strips.len() * STRIP * qs];
    for r in 0..rows {
        let row = &p.q[(h * p.nq + q0 + r) * p.dqk..][..p.dqk];
        for (lane, two) in xq[r * qs..].iter_mut().zip(row.chunks(2)) {
            *lane = pair(two[0], two.get(1).copied().unwrap_or(0.0));
        }
    }
    let dv_wide = packed.v_panels * PANEL;
    let mut acc = vec![0f32; strips.len() * STRIP * dv_wide];
    let (mut m, mut l) = (vec![f32::NEG_INFINITY; strips.len() * STRIP], vec![0f32; strips.len() * STRIP]);
    let mut s = [0f32; STRIP * BLOCK];
    // The probabilities as bf16 terms, key pairs per lane: row r's term k in lanes
    // `(r · TERMS + k) · 16..`, so the terms are the steps of one tile product.
    let mut terms = [0u32; STRIP * TERMS * BLOCK_PAIRS];
    let mut o = [0f32; STRIP * amx::PANELS * PANEL];
    // Every strip's keys lie in the packed blocks: they are what some query of the call sees.
    for b in packed.block_of(first)..=packed.block_of(last - 1) {
        let b0 = packed.block_start(b);
        for (si, &(ks, ke, range)) in strips.iter().enumerate() {
            let (j0, j1) = (ks.max(b0), ke.min(b0 + BLOCK).min(p.nk));
            if j0 >= j1 {
                continue;
            }
            // SAFETY: configured tiles (the caller); the strip's 32 rows of `qs` lanes, the
            // block's two panels of `qs · 16`, and 32 × 32 scores.
            unsafe { amx::tile::<T, 2>(t, &xq[si * STRIP * qs..(si + 1) * STRIP * qs], packed.keys(kvh, b), qs, &mut s) };
            let valid = mask.key_valid.map(|v| &v[j0..j1]);
            let unmasked = j0 == b0 && j1 == b0 + BLOCK && valid.is_none_or(|v| !v.contains(&false)) && mask.positions_all_visible(range, (mask.k_pos[j0], mask.k_pos[j1 - 1]));
            let strip_rows = rows.saturating_sub(si * STRIP).min(STRIP);
            for r in 0..STRIP {
                let row = &mut s[r * BLOCK..(r + 1) * BLOCK];
                scale_row(row, p.scale);
                if !unmasked {
                    for (c, x) in row.iter_mut().enumerate() {
                        let key = b0 + c;
                        if !(r < strip_rows && (j0..j1).contains(&key) && mask.allows(q0 + si * STRIP + r, key)) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
                let i = si * STRIP + r;
                let m_new = m[i].max(row_max(row));
                if m_new == f32::NEG_INFINITY {
                    row.fill(0.0);
                } else {
                    let alpha = exp::<Plain>(m[i] - m_new);
                    let sum = exp_shift_sum_scalar::<Plain>(row, m_new);
                    if alpha != 1.0 {
                        scale_row(&mut acc[i * dv_wide..(i + 1) * dv_wide], alpha);
                    }
                    l[i] = l[i] * alpha + sum;
                    m[i] = m_new;
                }
                for (c, two) in row.chunks_exact(2).enumerate() {
                    let mut rest = [two[0], two[1]];
                    for k in 0..TERMS {
                        let head = rest.map(round_to_bf16);
                        terms[(r * TERMS + k) * BLOCK_PAIRS + c] = pair(head[0], head[1]);
                        rest = [rest[0] - head[0], rest[1] - head[1]];
                    }
                }
            }
            let values = packed.values(kvh, b);
            for jp in (0..packed.v_panels).step_by(amx::PANELS) {
                let np = amx::PANELS.min(packed.v_panels - jp);
                let w = &values[jp * BLOCK_PAIRS * PANEL..];
                // SAFETY: configured tiles; 32 rows of `TERMS` steps of 16 pairs, `np` panels
                // of 16 × 16 lanes from panel `jp`, and 32 rows of `np · 16` values.
                unsafe {
                    match np {
                        1 => amx::tile_shared_b::<T, 1>(t, &terms, TERMS, w, &mut o[..STRIP * PANEL]),
                        _ => amx::tile_shared_b::<T, 2>(t, &terms, TERMS, w, &mut o),
                    }
                }
                for r in 0..STRIP {
                    let acc = &mut acc[(si * STRIP + r) * dv_wide + jp * PANEL..][..np * PANEL];
                    for (a, &x) in acc.iter_mut().zip(&o[r * np * PANEL..(r + 1) * np * PANEL]) {
                        *a += x;
                    }
                }
            }
        }
    }
    for r in 0..rows {
        if l[r] > 0.0 {
            let inv = 1.0 / l[r];
            for (o, &a) in out[r * p.dv..(r + 1) * p.dv].iter_mut().zip(&acc[r * dv_wide..]) {
                *o = a * inv;
            }
            lse[r] = m[r] + l[r].ln();
        }
    }
}

/// The tests' tiles: [`amx::model::Model`].
#[cfg(any(test, feature = "tile-model"))]
pub(crate) struct OnModel;

#[cfg(any(test, feature = "tile-model"))]
impl TileRunner for OnModel {
    fn run(&self, p: &Problem<'_>, packed: &Packed, h: usize, q0: usize, out: &mut [f32], lse: &mut [f32]) {
        // SAFETY: the model needs no configuration.
        unsafe { task(&mut amx::model::Model::new(), p, packed, h, q0, out, lse) }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::bf16::round_tensor;

    fn bf16_random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<f32> = (0..shape.0 * shape.1 * shape.2).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        round_tensor(&Tensor::from_vec(values, shape, &Device::Cpu).unwrap()).unwrap()
    }

    struct Case {
        name: &'static str,
        heads: usize,
        kv_heads: usize,
        nq: usize,
        nk: usize,
        dqk: usize,
        dv: usize,
        q_pos: Vec<i64>,
        k_pos: Vec<i64>,
        valid: Option<Vec<bool>>,
        causal: bool,
        window: Option<usize>,
    }

    fn case(name: &'static str, heads: usize, kv_heads: usize, nq: usize, nk: usize, dqk: usize, dv: usize) -> Case {
        Case { name, heads, kv_heads, nq, nk, dqk, dv, q_pos: (0..nq as i64).collect(), k_pos: (0..nk as i64).collect(), valid: None, causal: false, window: None }
    }

    fn cases() -> Vec<Case> {
        vec![
            case("dense, one block short", 2, 2, 45, 70, 64, 64),
            Case { causal: true, ..case("causal, grouped heads, two tasks, three value panels", 4, 2, 130, 130, 32, 48) },
            Case { window: Some(7), valid: Some((0..40).map(|i| i % 5 != 3).collect()), ..case("window, invalid keys, head size 24", 2, 1, 40, 40, 24, 8) },
            Case {
                // Queries far past the keys see none of them: output 0, lse -inf.
                q_pos: (0..33).map(|i| if i < 20 { 3 * i } else { 1000 + i }).collect(),
                k_pos: (0..50).map(|i| 2 * i).collect(),
                window: Some(4),
                ..case("sparse positions, queries seeing no key", 1, 1, 33, 50, 16, 16)
            },
            case("no keys", 2, 2, 10, 0, 16, 16),
            case("odd head size", 1, 1, 19, 33, 5, 3),
            Case { causal: true, window: Some(40), ..case("causal window across blocks", 2, 2, 200, 200, 64, 64) },
            // A few queries in the middle of many keys: only the blocks around them are packed.
            Case { q_pos: (300..310).collect(), window: Some(5), ..case("window, queries amid 500 keys", 2, 2, 10, 500, 32, 16) },
        ]
    }

    #[test]
    fn the_tile_loop_on_the_model_matches_the_reference_on_bf16_inputs() {
        check_against_the_reference(|q, k, v, mask, scale| attention_on(q, k, v, mask, scale, &OnModel).unwrap());
    }

    /// `attention_in(Bf16)` on this CPU: the AMX tiles where the process may use them, else the
    /// f32 kernel on the bf16 values; either holds the same bound.
    #[test]
    fn bf16_attention_on_this_cpu_matches_the_reference_on_bf16_inputs() {
        let on = if crate::bf16::Bf16Kernel::detect() == crate::bf16::Bf16Kernel::Amx { "AMX tiles" } else { "the f32 kernel (AMX not usable here)" };
        eprintln!("bf16 attention runs on {on}");
        check_against_the_reference(|q, k, v, mask, scale| crate::attention_in(crate::Precision::Bf16, q, k, v, mask, scale).unwrap());
    }

    fn check_against_the_reference(attend: impl Fn(&Tensor, &Tensor, &Tensor, &Mask<'_>, f32) -> Partial) {
        for c in cases() {
            let (q, k, v) = (bf16_random((c.heads, c.nq, c.dqk), 1), bf16_random((c.kv_heads, c.nk, c.dqk), 2), bf16_random((c.kv_heads, c.nk, c.dv), 3));
            let mask = Mask::full(&c.q_pos, &c.k_pos).with_causal(c.causal).with_window(c.window).with_key_valid(c.valid.as_deref());
            let scale = 1.0 / (c.dqk as f32).sqrt();
            let got = attend(&q, &k, &v, &mask, scale);
            let want = crate::reference::attention(&q, &k, &v, &mask, scale).unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (go, wo, gl, wl) = (flat(&got.out), flat(&want.out), flat(&got.lse), flat(&want.lse));
            let out_err = go.iter().zip(&wo).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(out_err < 2e-5, "{}: outputs {out_err} from the reference", c.name);
            for (i, (a, b)) in gl.iter().zip(&wl).enumerate() {
                assert!(a == b || (a - b).abs() < 2e-5, "{}: lse {i}: {a} vs {b}", c.name);
            }
        }
    }

    #[test]
    fn invalid_keys_values_never_reach_the_output_even_when_not_finite() {
        let c = Case { valid: Some((0..40).map(|i| i % 3 != 0).collect()), ..case("invalid keys", 1, 1, 20, 40, 16, 16) };
        let (q, k) = (bf16_random((1, 20, 16), 7), bf16_random((1, 40, 16), 8));
        let mut values = bf16_random((1, 40, 16), 9).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, v) in values.iter_mut().enumerate() {
            if (i / 16) % 3 == 0 {
                *v = if i % 2 == 0 { f32::NAN } else { f32::INFINITY };
            }
        }
        let v = Tensor::from_vec(values, (1, 40, 16), &Device::Cpu).unwrap();
        let mask = Mask::full(&c.q_pos, &c.k_pos).with_key_valid(c.valid.as_deref());
        let got = attention_on(&q, &k, &v, &mask, 0.25, &OnModel).unwrap();
        assert!(got.out.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|x| x.is_finite()));
    }

    /// What P ranks do: the keys in parts, each part's partial merged, against one call over
    /// every key.
    #[test]
    fn partials_over_parts_of_the_keys_merge_into_the_whole_calls_result() {
        let c = Case { causal: true, window: Some(60), ..case("causal window", 2, 1, 150, 150, 32, 48) };
        let (q, k, v) = (bf16_random((2, 150, 32), 10), bf16_random((1, 150, 32), 11), bf16_random((1, 150, 48), 12));
        let whole = attention_on(&q, &k, &v, &Mask::full(&c.q_pos, &c.k_pos).with_causal(true).with_window(c.window), 0.2, &OnModel).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for cuts in [vec![0, 70, 150], vec![0, 37, 100, 150]] {
            let parts: Vec<Partial> = cuts
                .windows(2)
                .map(|r| {
                    let (k, v) = (k.narrow(1, r[0], r[1] - r[0]).unwrap(), v.narrow(1, r[0], r[1] - r[0]).unwrap());
                    let mask = Mask::full(&c.q_pos, &c.k_pos[r[0]..r[1]]).with_causal(true).with_window(c.window);
                    attention_on(&q, &k, &v, &mask, 0.2, &OnModel).unwrap()
                })
                .collect();
            let merged = Partial::merge_all(&parts).unwrap().unwrap();
            let worst = flat(&merged.out).iter().zip(flat(&whole.out)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-6, "keys cut at {cuts:?}: {worst} from the whole call");
        }
    }

    #[test]
    fn a_query_gets_the_same_bits_whatever_queries_share_its_task() {
        let c = Case { window: Some(20), ..case("window", 2, 2, 150, 150, 32, 32) };
        let (q, k, v) = (bf16_random((2, 150, 32), 4), bf16_random((2, 150, 32), 5), bf16_random((2, 150, 32), 6));
        let mask = Mask::full(&c.q_pos, &c.k_pos).with_window(c.window);
        let all = attention_on(&q, &k, &v, &mask, 0.2, &OnModel).unwrap();
        for (start, len) in [(0, 1), (31, 40), (100, 50)] {
            let part_q = q.narrow(1, start, len).unwrap();
            let part_mask = Mask::full(&c.q_pos[start..start + len], &c.k_pos).with_window(c.window);
            let part = attention_on(&part_q, &k, &v, &part_mask, 0.2, &OnModel).unwrap();
            let want = all.out.narrow(1, start, len).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(part.out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "rows {start}..{}", start + len);
        }
    }
}
