//! bfloat16 matrix products with f32 accumulation, for [`Precision::Bf16`](crate::Precision)
//! runs: weights packed once into bf16 panels, activations rounded to bf16 (nearest even) as
//! they are packed, products accumulated in f32 in one fixed order per output element, so a row's
//! result does not depend on which rows share its product (P ranks give one rank's bits where
//! the ranks' CPUs run the same kernel); and a bf16 run's attention on AMX tiles (`attention`).
//!
//! The kernel is chosen at run time: AMX tiles (`amx`) where the process may use them, whose
//! bits are their own (each 16 pairs' even and odd products summed apart, as `tdpbf16ps` does);
//! else AVX512-BF16 dot products (`vdpbf16ps`) or AVX-512 f32 FMAs on the bf16 values,
//! whichever runs faster on this CPU (some run `vdpbf16ps` at half the FMA rate: measured once,
//! at first use), else a portable loop (clearly slower). These three give the same bits (up to
//! the flushing of subnormal sums), so the choice among them is one of speed alone.

#[cfg(all(feature = "tile-model", not(debug_assertions)))]
compile_error!("the `tile-model` feature runs every bf16 product on a scalar model of AMX: for test builds only");

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
pub(crate) mod attention;
mod convert;
#[cfg(target_arch = "x86_64")]
mod dpbf16;
#[cfg(target_arch = "x86_64")]
mod fma;
mod kernel;
mod packed;
mod portable;

use std::mem::MaybeUninit;

use candle_core::Tensor;
use rayon::prelude::*;

pub use convert::{round_to_bf16, to_bf16_bits};
pub use kernel::Bf16Kernel;
pub use packed::PackedBf16;

use crate::error::{shape_err, Result};
use crate::tensor::with_f32;
use convert::pair;
use kernel::run_tile;
use packed::PANEL;

/// Rows per tile.
pub(crate) const MR: usize = 8;
/// Panels per tile: 8 × 3 accumulators plus 3 panel registers and a broadcast fit the 32
/// vector registers.
pub(crate) const NR: usize = 3;
/// Rows whose bf16 copy a task packs and reuses across its panels: whole tiles of every kernel.
const ROW_CHUNK: usize = 64;
/// Values of the largest tile: AMX's, 32 rows × 2 panels (the vector kernels' are 8 × 3).
const TILE_VALUES: usize = 32 * 2 * PANEL;
/// Columns of the widest tile: the vector kernels' 3 panels (AMX's are 2).
const TILE_COLUMNS: usize = NR * PANEL;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(
    amx::ROWS * amx::PANELS * PANEL <= TILE_VALUES && MR * NR * PANEL <= TILE_VALUES && amx::PANELS <= NR && ROW_CHUNK.is_multiple_of(amx::ROWS) && ROW_CHUNK.is_multiple_of(MR)
);

/// A raw pointer the tasks of one product share; each writes elements no other task writes.
#[derive(Clone, Copy)]
struct Shared(*mut MaybeUninit<f32>);
// SAFETY: the tasks of a product write disjoint elements (their own rows × columns).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The element `i` places on.
    ///
    /// # Safety
    /// `i` lies within the buffer.
    unsafe fn at(self, i: usize) -> *mut MaybeUninit<f32> {
        // SAFETY: the caller keeps `i` within the buffer.
        unsafe { self.0.add(i) }
    }
}

/// `x · Wᵀ` for `x` (`m` rows of `w.in_features()` f32, row-major), each row's product handed
/// to `sink(row, first_column, values)` a tile row at a time; every (row, column) exactly once.
/// Tasks run in parallel, so `sink` must only write what its arguments name.
fn product(x: &[f32], m: usize, w: &PackedBf16, sink: &(dyn Fn(usize, usize, &[f32]) + Sync)) {
    // SAFETY: `detect` chooses among this CPU's kernels.
    unsafe { product_on(Bf16Kernel::detect(), x, m, w, sink) }
}

/// [`product`] on `kernel`.
///
/// # Safety
/// `kernel` is [`Bf16Kernel::Portable`] or one of [`Bf16Kernel::available`].
unsafe fn product_on(kernel: Bf16Kernel, x: &[f32], m: usize, w: &PackedBf16, sink: &(dyn Fn(usize, usize, &[f32]) + Sync)) {
    let (k, pairs, stride, panels) = (w.in_features(), w.pairs(), w.pair_stride(), w.panels());
    if m == 0 || panels == 0 {
        return;
    }
    let (tile_rows, tile_panels) = kernel.tile_shape();
    let groups = panels.div_ceil(tile_panels);
    let row_chunks = m.div_ceil(ROW_CHUNK);
    let threads = rayon::current_num_threads();
    // Few row chunks: split the columns too, so that every thread has work.
    let col_splits = if row_chunks >= 2 * threads { 1 } else { (2 * threads).div_ceil(row_chunks).min(groups).max(1) };
    (0..row_chunks * col_splits).into_par_iter().for_each(|task| {
        let (chunk, split) = (task / col_splits, task % col_splits);
        let rows = chunk * ROW_CHUNK..(m.min((chunk + 1) * ROW_CHUNK));
        let group_range = split * groups / col_splits..(split + 1) * groups / col_splits;
        // The chunk's rows rounded to bf16 as the kernel reads them (a pair per lane, or each
        // value as f32 bits), `stride` pairs apart, the lanes past the input zero, padded with
        // zero rows to whole tiles.
        let padded = rows.len().next_multiple_of(tile_rows);
        let lanes = stride * kernel.lanes_per_pair();
        let mut xp = vec![0u32; padded * lanes];
        // SAFETY: the caller runs this CPU's kernels only.
        unsafe { pack_rows(kernel, &x[rows.start * k..rows.end * k], k, lanes, &mut xp[..rows.len() * lanes]) };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AMX is one of `available`, so `amx::usable` returned true. Its tiles stay
        // configured on this thread for the task's tiles alone (`sink` runs no products).
        let _tiles = (kernel == Bf16Kernel::Amx).then(|| unsafe { amx::Session::begin() });
        let mut tile = [0f32; TILE_VALUES];
        for g in group_range {
            let np = tile_panels.min(panels - g * tile_panels);
            let first_col = g * tile_panels * PANEL;
            let width = (np * PANEL).min(w.out_features() - first_col);
            let panel = w.panel(g * tile_panels);
            for t in (0..padded).step_by(tile_rows) {
                let xt = &xp[t * lanes..(t + tile_rows) * lanes];
                // SAFETY: as above; whole tiles of rows `stride` pairs apart, and `np` whole
                // panels, with the session AMX needs.
                unsafe { run_tile(kernel, np, xt, panel, pairs, stride, &mut tile[..tile_rows * np * PANEL]) };
                for r in 0..tile_rows.min(rows.len() - t) {
                    sink(rows.start + t + r, first_col, &tile[r * np * PANEL..][..width]);
                }
            }
        }
    });
}

/// `rows` (row-major, `k` wide) rounded to bf16 into `packed` as `kernel` reads them, `lanes`
/// apart: a pair per lane, or each value as its f32 bits; the odd input past the end, and the
/// lanes past the input, are left as they are (zero).
///
/// # Safety
/// `kernel` is [`Bf16Kernel::Portable`] or one of [`Bf16Kernel::available`].
unsafe fn pack_rows(kernel: Bf16Kernel, rows: &[f32], k: usize, lanes: usize, packed: &mut [u32]) {
    #[inline(always)]
    fn pack(lanes_per_pair: usize, rows: &[f32], k: usize, lanes: usize, packed: &mut [u32]) {
        if k == 0 {
            return;
        }
        for (row, packed) in rows.chunks_exact(k).zip(packed.chunks_exact_mut(lanes)) {
            if lanes_per_pair == 1 {
                for (lane, two) in packed.iter_mut().zip(row.chunks(2)) {
                    *lane = pair(two[0], two.get(1).copied().unwrap_or(0.0));
                }
            } else {
                for (lane, &v) in packed.iter_mut().zip(row) {
                    *lane = round_to_bf16(v).to_bits();
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn pack_avx512(lanes_per_pair: usize, rows: &[f32], k: usize, lanes: usize, packed: &mut [u32]) {
        pack(lanes_per_pair, rows, k, lanes, packed)
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's kernel is available, and both vector kernels need AVX512F.
        Bf16Kernel::Avx512Bf16 | Bf16Kernel::Avx512Fma => unsafe { pack_avx512(kernel.lanes_per_pair(), rows, k, lanes, packed) },
        _ => pack(kernel.lanes_per_pair(), rows, k, lanes, packed),
    }
}

/// `epilogue(x Wᵀ + bias + residual)` as `[n, out]` f32, for `x` (`[n, in]` f32, rounded to
/// bf16 as it is packed) and `w` in bf16; the products accumulate in f32, the bias and residual
/// are added in f32. `epilogue` acts on each element alone.
pub fn linear(x: &Tensor, w: &PackedBf16, bias: Option<&Tensor>, residual: Option<&Tensor>, epilogue: impl Fn(&mut [f32]) + Sync) -> Result<Tensor> {
    const OP: &str = "bf16 linear";
    let (n, out_w) = (checked_rows(x, w, OP)?, w.out_features());
    let bias = checked_bias(bias, out_w, OP)?;
    if residual.is_some_and(|r| r.dims() != [n, out_w]) {
        return Err(shape_err(OP, format!("the residual must be [{n}, {out_w}], got {:?}", residual.map(|r| r.dims().to_vec()))));
    }
    let len = n * out_w;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = Shared(out.spare_capacity_mut().as_mut_ptr());
    let zeros = [0f32; TILE_COLUMNS];
    let run = |x: &[f32], residual: Option<&[f32]>| {
        product(x, n, w, &|row, col, values| {
            let at = row * out_w + col;
            let width = values.len();
            let mut sums = [0f32; TILE_COLUMNS];
            let sums = &mut sums[..width];
            let bias = bias.as_ref().map_or(&zeros[..width], |b| &b[col..col + width]);
            let residual = residual.map_or(&zeros[..width], |r| &r[at..at + width]);
            for (((s, &v), &b), &r) in sums.iter_mut().zip(values).zip(bias).zip(residual) {
                *s = v + b + r;
            }
            epilogue(sums);
            // SAFETY: `product` hands each (row, column) once; `at..at + width` lies in row
            // `row` of the `n × out_w` output.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.at(at), width) };
            for (d, &s) in dst.iter_mut().zip(sums.iter()) {
                d.write(s);
            }
        })
    };
    with_f32(x, OP, |x| match residual {
        Some(r) => with_f32(r, OP, |r| run(x, Some(r))),
        None => {
            run(x, None);
            Ok(())
        }
    })??;
    // SAFETY: `product` wrote every element of the `n × out_w` output.
    unsafe { out.set_len(len) };
    Ok(Tensor::from_vec(out, (n, out_w), &candle_core::Device::Cpu)?)
}

/// `x Wₕᵀ + bₕ` for every head h as `[heads, n, d]`, each value rounded to bf16: the queries,
/// keys and values attention takes in a bf16 run.
pub fn project_to_heads(x: &Tensor, w: &PackedBf16, bias: Option<&Tensor>, heads: usize) -> Result<Tensor> {
    let n = checked_rows(x, w, "bf16 project_to_heads")?;
    let d = head_dim(w, heads)?;
    let len = heads * n * d;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    project_into(x, w, bias, heads, &mut out.spare_capacity_mut()[..len], n, 0)?;
    // SAFETY: `project_into` wrote every row of every head.
    unsafe { out.set_len(len) };
    Ok(Tensor::from_vec(out, (heads, n, d), &candle_core::Device::Cpu)?)
}

/// As [`project_to_heads`], written into rows `at..at + n` of every head of `dst`, a
/// `[heads, rows, d]` buffer; its other rows are left as they are.
pub fn project_to_heads_into(x: &Tensor, w: &PackedBf16, bias: Option<&Tensor>, heads: usize, dst: &mut [f32], rows: usize, at: usize) -> Result<()> {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and only initialised values are written
    // through the view.
    let dst = unsafe { &mut *(std::ptr::from_mut(dst) as *mut [MaybeUninit<f32>]) };
    project_into(x, w, bias, heads, dst, rows, at)
}

/// Writes every element of rows `at..at + n` of each head of `dst` (`[heads, rows, d]`).
fn project_into(x: &Tensor, w: &PackedBf16, bias: Option<&Tensor>, heads: usize, dst: &mut [MaybeUninit<f32>], rows: usize, at: usize) -> Result<()> {
    const OP: &str = "bf16 project_to_heads";
    let n = checked_rows(x, w, OP)?;
    let width = head_dim(w, heads)?;
    if dst.len() != heads * rows * width || at + n > rows {
        return Err(shape_err(OP, format!("{n} rows of {heads} heads of {width} at row {at} do not fit a buffer of {} values with {rows} rows per head", dst.len())));
    }
    let bias = checked_bias(bias, w.out_features(), OP)?;
    let base = Shared(dst.as_mut_ptr());
    let zeros = [0f32; TILE_COLUMNS];
    with_f32(x, OP, |x| {
        product(x, n, w, &|row, col, values| {
            let bias = bias.as_ref().map_or(&zeros[..values.len()], |b| &b[col..col + values.len()]);
            // The segment in runs within one head each: contiguous in that head's row.
            let mut i = 0;
            while i < values.len() {
                let (h, j) = ((col + i) / width, (col + i) % width);
                let run = (width - j).min(values.len() - i);
                // SAFETY: (h, at + row, j..j + run) lies in the `[heads, rows, width]` buffer
                // checked above, and `product` hands each (row, column) once.
                let out = unsafe { std::slice::from_raw_parts_mut(base.at((h * rows + at + row) * width + j), run) };
                for ((out, &v), &b) in out.iter_mut().zip(&values[i..i + run]).zip(&bias[i..i + run]) {
                    out.write(round_to_bf16(v + b));
                }
                i += run;
            }
        })
    })
}

/// `t` (f32) with each value rounded to bf16, as attention takes queries, keys and values in a
/// bf16 run.
pub fn round_tensor(t: &Tensor) -> Result<Tensor> {
    let values = with_f32(t, "round_tensor", |v| v.iter().map(|&v| round_to_bf16(v)).collect::<Vec<f32>>())?;
    Ok(Tensor::from_vec(values, t.dims(), &candle_core::Device::Cpu)?)
}

fn checked_rows(x: &Tensor, w: &PackedBf16, op: &'static str) -> Result<usize> {
    match x.dims() {
        &[n, k] if k == w.in_features() => Ok(n),
        other => Err(shape_err(op, format!("x must be [tokens, {}], got {other:?}", w.in_features()))),
    }
}

fn checked_bias(bias: Option<&Tensor>, out: usize, op: &'static str) -> Result<Option<Vec<f32>>> {
    match bias {
        Some(b) if b.dims() != [out] => Err(shape_err(op, format!("the bias must be [{out}], got {:?}", b.dims()))),
        Some(b) => Ok(Some(with_f32(b, op, |b| b.to_vec())?)),
        None => Ok(None),
    }
}

fn head_dim(w: &PackedBf16, heads: usize) -> Result<usize> {
    if heads == 0 || !w.out_features().is_multiple_of(heads) {
        return Err(shape_err("bf16 project_to_heads", format!("{} outputs do not make {heads} heads", w.out_features())));
    }
    Ok(w.out_features() / heads)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The product as the kernels define it, one element at a time: bf16 inputs, per pair the
    /// odd input's product added before the even one's, in f32.
    fn defined(x: &[f32], m: usize, w: &[f32], out: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * out];
        for i in 0..m {
            for o in 0..out {
                let mut acc = 0f32;
                for q in 0..k.div_ceil(2) {
                    if 2 * q + 1 < k {
                        acc += round_to_bf16(x[i * k + 2 * q + 1]) * round_to_bf16(w[o * k + 2 * q + 1]);
                    }
                    acc += round_to_bf16(x[i * k + 2 * q]) * round_to_bf16(w[o * k + 2 * q]);
                }
                y[i * out + o] = acc;
            }
        }
        y
    }

    fn run(kernel: Bf16Kernel, x: &[f32], m: usize, w: &PackedBf16) -> Vec<f32> {
        let out = w.out_features();
        let y = Mutex::new(vec![f32::NAN; m * out]);
        // SAFETY: `kernels` lists this CPU's kernels and the portable one.
        unsafe {
            product_on(kernel, x, m, w, &|row, col, values| {
                let mut y = y.lock().unwrap();
                for (i, &v) in values.iter().enumerate() {
                    assert!(y[row * out + col + i].is_nan(), "({row}, {}) written twice", col + i);
                    y[row * out + col + i] = v;
                }
            })
        };
        y.into_inner().unwrap()
    }

    /// The product as `tdpbf16ps` defines it (Intel's SDM): per step of 16 pairs, the even
    /// inputs' products summed apart from the odd ones', and their sum added to the element.
    fn defined_in_steps(x: &[f32], m: usize, w: &[f32], out: usize, k: usize) -> Vec<f32> {
        let at = |v: &[f32], row: usize, i: usize| if i < k { round_to_bf16(v[row * k + i]) } else { 0.0 };
        let mut y = vec![0f32; m * out];
        for i in 0..m {
            for o in 0..out {
                let mut acc = 0f32;
                for step in (0..k.div_ceil(2)).step_by(16) {
                    let (mut even, mut odd) = (0f32, 0f32);
                    for q in step..step + 16 {
                        even += at(x, i, 2 * q) * at(w, o, 2 * q);
                        odd += at(x, i, 2 * q + 1) * at(w, o, 2 * q + 1);
                    }
                    acc += even + odd;
                }
                y[i * out + o] = acc;
            }
        }
        y
    }

    /// How far two f32 sums of an element's `k` products, in any two orders, may lie apart.
    fn order_bound(x: &[f32], m: usize, w: &[f32], out: usize, k: usize) -> Vec<f32> {
        let mut bound = vec![0f32; m * out];
        for i in 0..m {
            for o in 0..out {
                let magnitude: f32 = (0..k).map(|j| (round_to_bf16(x[i * k + j]) * round_to_bf16(w[o * k + j])).abs()).sum();
                bound[i * out + o] = 2.0 * (k as f32 + 16.0) * f32::EPSILON * magnitude;
            }
        }
        bound
    }

    fn kernels() -> Vec<Bf16Kernel> {
        let mut k = Bf16Kernel::available();
        if !k.contains(&Bf16Kernel::Portable) {
            k.push(Bf16Kernel::Portable);
        }
        #[cfg(target_arch = "x86_64")]
        k.push(Bf16Kernel::AmxModel);
        eprintln!("checking the kernels {:?}; {} is this CPU's fastest", k, Bf16Kernel::detect().name());
        if !k.contains(&Bf16Kernel::Amx) {
            eprintln!("AMX: not usable here (no AMX-BF16, or no tile-data permission); its tile loop runs on the model alone");
        }
        k
    }

    #[test]
    fn every_kernel_gives_its_defined_product_on_ragged_shapes() {
        for (m, out, k) in [(4, 20, 0), (1, 1, 1), (7, 17, 3), (8, 48, 64), (9, 49, 65), (33, 31, 33), (130, 100, 384), (64, 1536, 384), (3, 40, 1536)] {
            let (x, w) = (random(m * k, 1), random(out * k, 2));
            let packed = PackedBf16::from_rows(&w, out, k);
            let (pair_by_pair, in_steps, bound) = (defined(&x, m, &w, out, k), defined_in_steps(&x, m, &w, out, k), order_bound(&x, m, &w, out, k));
            for kernel in kernels() {
                let got = run(kernel, &x, m, &packed);
                let shape = format!("{} kernel, {m}×{out}×{k}", kernel.name());
                let differ = |want: &[f32]| got.iter().zip(want).filter(|(g, w)| g.to_bits() != w.to_bits()).count();
                if kernel.sums_pair_by_pair() {
                    assert_eq!(differ(&pair_by_pair), 0, "{shape}: elements differ from the defined product");
                    continue;
                }
                let outside = got.iter().zip(&pair_by_pair).zip(&bound).filter(|((g, w), b)| (*g - *w).abs() > **b).count();
                assert_eq!(outside, 0, "{shape}: elements farther from the pair-by-pair product than f32 reordering allows");
                #[cfg(target_arch = "x86_64")]
                match kernel {
                    Bf16Kernel::AmxModel => assert_eq!(differ(&in_steps), 0, "{shape}: elements differ from the SDM's step order"),
                    _ => eprintln!("{shape}: {} of {} elements differ from the SDM's step order", differ(&in_steps), got.len()),
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_whatever_rows_share_its_product() {
        let (m, out, k) = (200, 96, 130);
        let (x, w) = (random(m * k, 3), random(out * k, 4));
        let packed = PackedBf16::from_rows(&w, out, k);
        for kernel in kernels() {
            let all = run(kernel, &x, m, &packed);
            for (start, rows) in [(0, 1), (5, 3), (77, 64), (199, 1)] {
                let part = run(kernel, &x[start * k..(start + rows) * k], rows, &packed);
                assert_eq!(part, all[start * out..(start + rows) * out], "{} kernel, rows {start}..{}", kernel.name(), start + rows);
            }
        }
    }

    #[test]
    fn linear_adds_bias_and_residual_in_f32_then_the_epilogue() -> Result<()> {
        let (n, out, k) = (21, 33, 19);
        let dev = Device::Cpu;
        let (x, w, b, r) = (random(n * k, 5), random(out * k, 6), random(out, 7), random(n * out, 8));
        let packed = PackedBf16::from_rows(&w, out, k);
        let xt = Tensor::from_vec(x.clone(), (n, k), &dev)?;
        let (bt, rt) = (Tensor::from_vec(b.clone(), out, &dev)?, Tensor::from_vec(r.clone(), (n, out), &dev)?);
        let got = linear(&xt, &packed, Some(&bt), Some(&rt), |v| v.iter_mut().for_each(|v| *v = v.max(0.0)))?.flatten_all()?.to_vec1::<f32>()?;
        let product = defined(&x, n, &w, out, k);
        let want: Vec<f32> = (0..n * out).map(|i| (product[i] + b[i % out] + r[i]).max(0.0)).collect();
        assert_eq!(got, want);
        let plain = linear(&xt, &packed, None, None, |_| {})?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(plain, product);
        Ok(())
    }

    #[test]
    fn heads_hold_the_product_rounded_to_bf16_in_their_rows() -> Result<()> {
        let (n, heads, d, k) = (13, 3, 20, 24);
        let dev = Device::Cpu;
        let (x, w, b) = (random(n * k, 9), random(heads * d * k, 10), random(heads * d, 11));
        let packed = PackedBf16::from_rows(&w, heads * d, k);
        let xt = Tensor::from_vec(x.clone(), (n, k), &dev)?;
        let bt = Tensor::from_vec(b.clone(), heads * d, &dev)?;
        let got = project_to_heads(&xt, &packed, Some(&bt), heads)?;
        assert_eq!(got.dims(), [heads, n, d]);
        let got = got.flatten_all()?.to_vec1::<f32>()?;
        let product = defined(&x, n, &w, heads * d, k);
        for h in 0..heads {
            for i in 0..n {
                for j in 0..d {
                    let want = round_to_bf16(product[i * heads * d + h * d + j] + b[h * d + j]);
                    assert_eq!(got[(h * n + i) * d + j], want, "head {h} row {i} col {j}");
                }
            }
        }
        // Into rows 4.. of a 20-row buffer; the other rows stay.
        let mut buffer = vec![-7f32; heads * 20 * d];
        project_to_heads_into(&xt, &packed, Some(&bt), heads, &mut buffer, 20, 4)?;
        for h in 0..heads {
            for row in 0..20 {
                let slot = &buffer[(h * 20 + row) * d..][..d];
                if (4..4 + n).contains(&row) {
                    assert_eq!(slot, &got[(h * n + row - 4) * d..][..d]);
                } else {
                    assert!(slot.iter().all(|&v| v == -7.0));
                }
            }
        }
        assert!(project_to_heads_into(&xt, &packed, None, heads, &mut buffer, 20, 8).is_err(), "rows past the buffer are refused");
        assert!(project_to_heads(&xt, &packed, None, 7).is_err(), "60 outputs do not make 7 heads");
        Ok(())
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() -> Result<()> {
        let packed = PackedBf16::from_rows(&random(6, 1), 2, 3);
        let x = Tensor::zeros((4, 5), candle_core::DType::F32, &Device::Cpu)?;
        assert!(linear(&x, &packed, None, None, |_| {}).is_err());
        let x = Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu)?;
        let wrong = Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu)?;
        assert!(linear(&x, &packed, Some(&wrong), None, |_| {}).is_err());
        assert!(linear(&x, &packed, None, Some(&wrong), |_| {}).is_err());
        assert_eq!(linear(&x.narrow(0, 0, 0)?, &packed, None, None, |_| {})?.dims(), [0, 2]);
        Ok(())
    }
}
