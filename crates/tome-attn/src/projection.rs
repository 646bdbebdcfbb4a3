//! Linear projections written into attention-head layout: `x Wₕᵀ + bₕ` for every head h, as
//! `[heads, n, d]`, the weight read in place in Hugging Face's `[out, in]` layout. Wide heads
//! get one GEMM each, writing the head's rows where they belong; narrow heads are projected
//! together a block of rows at a time into a small reused buffer, scattered to the heads while
//! in cache. Either way no `[n, heads·d]` temporary and no strided copy of one exists: their
//! traffic and page faults would cost as much as the product itself.
//!
//! The threads split the heads, or the row blocks, rather than each GEMM: a GEMM of a few
//! hundred rows split over threads runs at half the rate of the same GEMM on one thread per
//! piece of work (the split's synchronisation and the re-packing of its operands per thread),
//! and a window layer projects its queries a block of a few hundred rows at a time.
//!
//! [`linear`] is the same product without the head split, with the residual connection and an
//! elementwise epilogue (the feed-forward activation) folded in: the output is filled with
//! `bias + residual` and the GEMM accumulates onto it, so neither a broadcast bias add nor a
//! residual add makes a pass of its own or a tensor of its own.
//!
//! [`Projection`] is a layer's weights as a run's precision reads them: these f32 products, or
//! [`crate::bf16`]'s on packed bf16 weights.

use std::mem::MaybeUninit;

use candle_core::Tensor;
use rayon::prelude::*;

use crate::bf16::{self, PackedBf16};
use crate::error::{shape_err, Result};
use crate::tensor::with_f32;

const OP: &str = "project_to_heads";

/// Head width from which each head gets a GEMM of its own: narrower heads fill too few of the
/// micro-kernel's columns, and all heads are projected together in row blocks instead.
const WIDE_HEAD: usize = 64;

/// Token rows per GEMM of narrow heads: the block's `[rows, heads·d]` product is scattered to
/// the heads while still in cache.
const ROWS: usize = 256;

/// Rows from which a wide head's GEMM splits over the threads as fast as the heads would (about
/// 240 GFLOP/s on two threads at 768 rows and more), without every thread packing its own copy
/// of `x` at once. Below it the heads split, each GEMM on one thread: at 192 rows a GEMM split
/// over two threads ran at 132 GFLOP/s, the heads split at 170–209.
const SPLIT_GEMM_ROWS: usize = 1024;

/// `x` (`[n, in]`) projected by `weight` (`[heads·d, in]`) and `bias` (`[heads·d]`), as
/// `[heads, n, d]`.
pub fn project_to_heads(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, heads: usize) -> Result<Tensor> {
    let (n, d) = heads_shape(x, weight, bias, heads)?;
    let len = heads * n * d;
    // Not zeroed first: every element is written below (a reused heap block would otherwise be
    // cleared only to be overwritten).
    let mut out: Vec<f32> = Vec::with_capacity(len);
    project_into(x, weight, bias, heads, &mut out.spare_capacity_mut()[..len], (n, 0))?;
    // SAFETY: `project_into` wrote every element of the `n` rows of every head.
    unsafe { out.set_len(len) };
    Ok(Tensor::from_vec(out, (heads, n, d), &candle_core::Device::Cpu)?)
}

/// As [`project_to_heads`], written into rows `at..at + n` of every head of `dst`, a
/// `[heads, rows, d]` buffer (row-major); its other rows are left as they are. A window layer's
/// keys and values for a chunk of queries live in one such buffer, its new rows projected
/// straight into place.
pub fn project_to_heads_into(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, heads: usize, dst: &mut [f32], rows: usize, at: usize) -> Result<()> {
    let (n, d) = heads_shape(x, weight, bias, heads)?;
    if dst.len() != heads * rows * d || at + n > rows {
        return Err(shape_err(OP, format!("{n} rows of {heads} heads of {d} at row {at} do not fit a buffer of {} values with {rows} rows per head", dst.len())));
    }
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and only initialised values are written
    // through the view.
    let dst = unsafe { &mut *(std::ptr::from_mut(dst) as *mut [MaybeUninit<f32>]) };
    project_into(x, weight, bias, heads, dst, (rows, at))
}

/// The rows and head width of `x` projected by `weight` and `bias` into `heads` heads, once
/// their shapes are checked.
fn heads_shape(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, heads: usize) -> Result<(usize, usize)> {
    let (n, width_in) = x.dims2().map_err(|_| shape_err(OP, format!("x must be [tokens, in], got {:?}", x.dims())))?;
    let (width_out, w_in) = weight.dims2().map_err(|_| shape_err(OP, format!("the weight must be [out, in], got {:?}", weight.dims())))?;
    if w_in != width_in || heads == 0 || width_out % heads != 0 {
        return Err(shape_err(OP, format!("x {:?} and weight {:?} do not make {heads} heads", x.dims(), weight.dims())));
    }
    if bias.is_some_and(|b| b.dims() != [width_out]) {
        return Err(shape_err(OP, format!("the bias must be [{width_out}], got {:?}", bias.map(|b| b.dims().to_vec()))));
    }
    Ok((n, width_out / heads))
}

/// Writes every element of rows `at..at + n` of each head of `dst` (`[heads, rows, d]`), shapes
/// checked by the caller.
fn project_into(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, heads: usize, dst: &mut [MaybeUninit<f32>], (rows, at): (usize, usize)) -> Result<()> {
    let (n, width_in) = x.dims2()?;
    let width_out = weight.dim(0)?;
    if n == 0 || dst.is_empty() {
        return Ok(());
    }
    let bias = bias.map(|b| with_f32(b, OP, |b| b.to_vec())).transpose()?;
    with_f32(x, OP, |x| {
        with_f32(weight, OP, |w| {
            let shape = Shape { n, width_in, width_out, d: width_out / heads, before: at, rows };
            if shape.d >= WIDE_HEAD {
                per_head(dst, x, w, bias.as_deref(), shape);
            } else {
                row_blocks(dst, x, w, bias.as_deref(), shape);
            }
        })
    })?
}

/// Elements per parallel piece of an epilogue.
const EPILOGUE_CHUNK: usize = 1 << 14;

/// `epilogue(x Wᵀ + bias + residual)` as `[n, out]` for `x` (`[n, in]`), `weight` (`[out, in]`),
/// `bias` (`[out]`) and `residual` (`[n, out]`); `epilogue` runs over pieces of the output in
/// parallel and must act on each element alone.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>, epilogue: impl Fn(&mut [f32]) + Sync) -> Result<Tensor> {
    const OP: &str = "linear";
    let (n, width_in) = x.dims2().map_err(|_| shape_err(OP, format!("x must be [tokens, in], got {:?}", x.dims())))?;
    let (width_out, w_in) = weight.dims2().map_err(|_| shape_err(OP, format!("the weight must be [out, in], got {:?}", weight.dims())))?;
    if w_in != width_in {
        return Err(shape_err(OP, format!("x {:?} does not fit the weight {:?}", x.dims(), weight.dims())));
    }
    if bias.is_some_and(|b| b.dims() != [width_out]) {
        return Err(shape_err(OP, format!("the bias must be [{width_out}], got {:?}", bias.map(|b| b.dims().to_vec()))));
    }
    if residual.is_some_and(|r| r.dims() != [n, width_out]) {
        return Err(shape_err(OP, format!("the residual must be [{n}, {width_out}], got {:?}", residual.map(|r| r.dims().to_vec()))));
    }
    if n == 0 || width_out == 0 {
        return Ok(Tensor::zeros((n, width_out), candle_core::DType::F32, &candle_core::Device::Cpu)?);
    }
    let bias = bias.map(|b| with_f32(b, OP, |b| b.to_vec())).transpose()?;
    // The GEMM accumulates onto residual + bias, written in one parallel pass of whole rows, or
    // writes every element itself when there is neither: the output is never zeroed first.
    let len = n * width_out;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let dst = &mut out.spare_capacity_mut()[..len];
    let piece = (EPILOGUE_CHUNK / width_out).max(1) * width_out;
    match (residual, &bias) {
        (Some(residual), bias) => with_f32(residual, OP, |r| {
            dst.par_chunks_mut(piece).zip(r.par_chunks(piece)).for_each(|(o, r)| match bias {
                Some(b) => o.chunks_exact_mut(width_out).zip(r.chunks_exact(width_out)).for_each(|(o, r)| {
                    o.iter_mut().zip(r.iter().zip(b)).for_each(|(o, (&r, &b))| {
                        o.write(r + b);
                    })
                }),
                None => {
                    o.write_copy_of_slice(r);
                }
            })
        })?,
        (None, Some(b)) => dst.par_chunks_mut(piece).for_each(|o| {
            o.chunks_exact_mut(width_out).for_each(|row| {
                row.write_copy_of_slice(b);
            })
        }),
        (None, None) => {}
    }
    let read_dst = bias.is_some() || residual.is_some();
    with_f32(x, OP, |x| {
        with_f32(weight, OP, |w| {
            // SAFETY: `dst` is n × out row-major, `x` n × in row-major, and the weight (out ×
            // in row-major), read as the in × out matrix Wᵀ, has columns `in` apart. The GEMM
            // reads `dst` only where it was written above.
            unsafe {
                gemm_into(
                    n,
                    width_out,
                    width_in,
                    (dst.as_mut_ptr().cast(), 1, width_out as isize),
                    read_dst,
                    (x.as_ptr(), 1, width_in as isize),
                    (w.as_ptr(), width_in as isize, 1),
                    parallelism(),
                )
            }
        })
    })??;
    // SAFETY: every element was written, by the fill above or by the GEMM.
    unsafe { out.set_len(len) };
    out.par_chunks_mut(EPILOGUE_CHUNK).for_each(&epilogue);
    Ok(Tensor::from_vec(out, (n, width_out), &candle_core::Device::Cpu)?)
}

/// The GEMM's threads: the whole pool.
fn parallelism() -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

#[derive(Clone, Copy)]
struct Shape {
    n: usize,
    width_in: usize,
    width_out: usize,
    d: usize,
    /// Rows of margin ahead of each head's `n` rows, and the head's rows in all.
    before: usize,
    rows: usize,
}

/// `dst := bias + lhs · rhs` for an m × n `dst` and an m × k `lhs`, every matrix given by
/// (column stride, row stride). Without `read_dst` every element of `dst` is written (zeros when
/// k = 0) and none read, so `dst` may start uninitialised.
///
/// # Safety
/// Each pointer spans its matrix under its strides.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: (*mut f32, isize, isize),
    read_dst: bool,
    lhs: (*const f32, isize, isize),
    rhs: (*const f32, isize, isize),
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe { gemm::gemm(m, n, k, dst.0, dst.1, dst.2, read_dst, lhs.0, lhs.1, lhs.2, rhs.0, rhs.1, rhs.2, 1.0, 1.0, false, false, false, parallelism) }
}

/// Whether `pieces` independent GEMMs keep every thread busy when each runs on one thread: they
/// divide evenly among the threads, or outnumber them enough that the last round's idle
/// threads cost little.
fn pieces_fill_threads(pieces: usize) -> bool {
    let threads = rayon::current_num_threads();
    threads > 1 && pieces >= threads && (pieces.is_multiple_of(threads) || pieces >= 4 * threads)
}

/// Wide heads: one GEMM per head over every row, writing every element of the head's rows in
/// place. Below [`SPLIT_GEMM_ROWS`] rows the heads run in parallel, each GEMM on one thread,
/// where they fill the threads; otherwise one at a time, each GEMM on every thread.
fn per_head(out: &mut [MaybeUninit<f32>], x: &[f32], w: &[f32], bias: Option<&[f32]>, s: Shape) {
    let Shape { n, width_in, width_out, d, before, rows } = s;
    let head_gemm = |(h, head): (usize, &mut [MaybeUninit<f32>]), parallelism: gemm::Parallelism| {
        let head = &mut head[before * d..(before + n) * d];
        if let Some(b) = bias {
            for row in head.chunks_exact_mut(d) {
                row.write_copy_of_slice(&b[h * d..(h + 1) * d]);
            }
        }
        let w_head = &w[h * d * width_in..(h + 1) * d * width_in];
        // SAFETY: `head` is n × d with rows d apart, `x` n × in row-major, and the head's weight
        // rows, read as the in × d matrix Wₕᵀ, have columns `in` apart. The GEMM reads `head`
        // only when the bias was written into it, and otherwise writes all of it.
        unsafe {
            gemm_into(
                n,
                d,
                width_in,
                (head.as_mut_ptr().cast(), 1, d as isize),
                bias.is_some(),
                (x.as_ptr(), 1, width_in as isize),
                (w_head.as_ptr(), width_in as isize, 1),
                parallelism,
            )
        }
    };
    if n < SPLIT_GEMM_ROWS && pieces_fill_threads(width_out / d) {
        out.par_chunks_exact_mut(rows * d).enumerate().for_each(|head| head_gemm(head, gemm::Parallelism::None));
    } else {
        out.chunks_exact_mut(rows * d).enumerate().for_each(|head| head_gemm(head, parallelism()));
    }
}

/// Narrow heads: one GEMM over all heads per block of rows, into a buffer whose rows are
/// scattered to their heads while still in cache, writing every element of `out`. The blocks
/// run in parallel, each GEMM on one thread, where they fill the threads (each run of blocks a
/// thread takes reuses one buffer); otherwise one at a time, each GEMM on every thread.
fn row_blocks(out: &mut [MaybeUninit<f32>], x: &[f32], w: &[f32], bias: Option<&[f32]>, s: Shape) {
    let Shape { n, width_in, width_out, d, before, rows: head_rows } = s;
    // Block b's rows of every head, in head order.
    let mut blocks: Vec<Vec<&mut [MaybeUninit<f32>]>> = (0..n.div_ceil(ROWS)).map(|_| Vec::with_capacity(width_out / d)).collect();
    for head in out.chunks_exact_mut(head_rows * d) {
        for (block, rows) in blocks.iter_mut().zip(head[before * d..(before + n) * d].chunks_mut(ROWS * d)) {
            block.push(rows);
        }
    }
    let project_block = |scratch: &mut Vec<f32>, (b, mut heads): (usize, Vec<&mut [MaybeUninit<f32>]>), parallelism: gemm::Parallelism| {
        let start = b * ROWS;
        let rows = ROWS.min(n - start);
        scratch.resize(rows * width_out, 0.0);
        let scratch = &mut scratch[..rows * width_out];
        if let Some(b) = bias {
            for row in scratch.chunks_exact_mut(width_out) {
                row.copy_from_slice(b);
            }
        }
        // SAFETY: `scratch` is rows × out row-major, the block of `x` rows × in row-major, and
        // the weight (out × in row-major), read as the in × out matrix Wᵀ, has columns `in` apart.
        unsafe {
            gemm_into(
                rows,
                width_out,
                width_in,
                (scratch.as_mut_ptr(), 1, width_out as isize),
                bias.is_some(),
                (x[start * width_in..].as_ptr(), 1, width_in as isize),
                (w.as_ptr(), width_in as isize, 1),
                parallelism,
            )
        }
        for (h, head) in heads.iter_mut().enumerate() {
            for (dst, row) in head.chunks_exact_mut(d).zip(scratch.chunks_exact(width_out)) {
                dst.write_copy_of_slice(&row[h * d..(h + 1) * d]);
            }
        }
    };
    if pieces_fill_threads(blocks.len()) {
        blocks.into_par_iter().enumerate().for_each_init(Vec::new, |scratch, block| project_block(scratch, block, gemm::Parallelism::None));
    } else {
        let mut scratch = Vec::new();
        blocks.into_iter().enumerate().for_each(|block| project_block(&mut scratch, block, parallelism()));
    }
}

/// A linear layer's weights as the products read them: the checkpoint's f32 (the exact path) or
/// packed bf16 ([`Precision::Bf16`](crate::Precision) runs). The bias is f32 either way.
#[derive(Clone, Copy, Debug)]
pub enum Projection<'a> {
    /// `[out, in]` f32, through the products above.
    F32 { weight: &'a Tensor, bias: Option<&'a Tensor> },
    /// Packed bf16, through [`crate::bf16`]'s products.
    Bf16 { weight: &'a PackedBf16, bias: Option<&'a Tensor> },
}

impl<'a> From<&'a candle_nn::Linear> for Projection<'a> {
    fn from(linear: &'a candle_nn::Linear) -> Self {
        Projection::F32 { weight: linear.weight(), bias: linear.bias() }
    }
}

impl Projection<'_> {
    /// Output features.
    pub fn out_features(&self) -> Result<usize> {
        match self {
            Projection::F32 { weight, .. } => Ok(weight.dim(0)?),
            Projection::Bf16 { weight, .. } => Ok(weight.out_features()),
        }
    }

    /// [`project_to_heads`]; in bf16 each value is rounded to bf16, as attention takes it.
    pub fn to_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        match *self {
            Projection::F32 { weight, bias } => project_to_heads(x, weight, bias, heads),
            Projection::Bf16 { weight, bias } => bf16::project_to_heads(x, weight, bias, heads),
        }
    }

    /// [`project_to_heads_into`]; in bf16 each value is rounded to bf16.
    pub fn to_heads_into(&self, x: &Tensor, heads: usize, dst: &mut [f32], rows: usize, at: usize) -> Result<()> {
        match *self {
            Projection::F32 { weight, bias } => project_to_heads_into(x, weight, bias, heads, dst, rows, at),
            Projection::Bf16 { weight, bias } => bf16::project_to_heads_into(x, weight, bias, heads, dst, rows, at),
        }
    }

    /// [`linear`]: `epilogue(x Wᵀ + bias + residual)`, f32 out in either precision.
    pub fn linear(&self, x: &Tensor, residual: Option<&Tensor>, epilogue: impl Fn(&mut [f32]) + Sync) -> Result<Tensor> {
        match *self {
            Projection::F32 { weight, bias } => linear(x, weight, bias, residual, epilogue),
            Projection::Bf16 { weight, bias } => bf16::linear(x, weight, bias, residual, epilogue),
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{linear, project_to_heads, project_to_heads_into};

    #[test]
    fn matches_matmul_then_split_heads() {
        let dev = Device::Cpu;
        // Narrow heads (row blocks, over several blocks at 300 rows) and wide heads (a GEMM per head).
        for (n, width_in, heads, d, bias) in [(37, 24, 3, 8, true), (5, 16, 2, 6, false), (0, 8, 2, 4, true), (300, 64, 4, 16, true), (70, 32, 2, 64, true), (9, 16, 3, 80, false)]
        {
            let x = Tensor::randn(0f32, 1.0, (n, width_in), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (heads * d, width_in), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, heads * d, &dev).unwrap();
            let got = project_to_heads(&x, &w, bias.then_some(&b), heads).unwrap();
            let mut want = x.matmul(&w.t().unwrap()).unwrap();
            if bias {
                want = want.broadcast_add(&b).unwrap();
            }
            let want = want.reshape((n, heads, d)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap();
            assert_eq!(got.dims(), &[heads, n, d]);
            let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).map(|m| m.to_scalar::<f32>().unwrap()).unwrap_or(0.0);
            assert!(diff < 1e-4, "n={n} in={width_in} heads={heads} d={d} bias={bias}: {diff}");
        }
    }

    #[test]
    fn thread_counts_split_heads_and_row_blocks_to_the_same_bits() {
        // One thread runs every GEMM alone; two split the heads (8 wide ones, or 2) or the row
        // blocks (narrow heads over 1100 rows); three split the GEMMs themselves (3 wide heads,
        // 5 row blocks), as every thread count does for wide heads over 1030 rows; eight split
        // the 8 wide heads again.
        let dev = Device::Cpu;
        for (n, width_in, heads, d) in [(200, 48, 8, 64), (90, 32, 2, 64), (50, 24, 3, 80), (1030, 32, 2, 64), (1100, 40, 4, 16), (100, 40, 4, 16)] {
            let x = Tensor::randn(0f32, 1.0, (n, width_in), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (heads * d, width_in), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, heads * d, &dev).unwrap();
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| project_to_heads(&x, &w, Some(&b), heads).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            let alone = on(1);
            for threads in [2, 3, 8] {
                assert_eq!(on(threads), alone, "n={n} heads={heads} d={d} on {threads} threads");
            }
        }
    }

    #[test]
    fn rows_projected_into_a_buffer_leave_its_other_rows_alone() {
        let dev = Device::Cpu;
        for (n, width_in, heads, d, (at, rows)) in [(37, 24, 3, 8, (5, 42)), (300, 64, 4, 16, (0, 307)), (70, 32, 2, 64, (3, 77)), (0, 8, 2, 4, (2, 3))] {
            let x = Tensor::randn(0f32, 1.0, (n, width_in), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (heads * d, width_in), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, heads * d, &dev).unwrap();
            let plain = project_to_heads(&x, &w, Some(&b), heads).unwrap();
            let mut buffer: Vec<f32> = (0..heads * rows * d).map(|i| i as f32).collect();
            let before = buffer.clone();
            project_to_heads_into(&x, &w, Some(&b), heads, &mut buffer, rows, at).unwrap();
            let buffer = Tensor::from_vec(buffer, (heads, rows, d), &dev).unwrap();
            let before = Tensor::from_vec(before, (heads, rows, d), &dev).unwrap();
            let rows_of = |t: &Tensor, from: usize, len: usize| t.narrow(1, from, len).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Bit for bit: the same GEMMs, written at an offset.
            assert_eq!(rows_of(&buffer, at, n), rows_of(&plain, 0, n));
            assert_eq!(rows_of(&buffer, 0, at), rows_of(&before, 0, at));
            assert_eq!(rows_of(&buffer, at + n, rows - at - n), rows_of(&before, at + n, rows - at - n));
        }
        // Rows that do not fit the buffer are refused.
        let x = Tensor::zeros((4, 8), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((8, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(project_to_heads_into(&x, &w, None, 2, &mut [0.0; 2 * 5 * 4], 5, 2).is_err());
        assert!(project_to_heads_into(&x, &w, None, 2, &mut [0.0; 2 * 5 * 3], 5, 0).is_err());
    }

    #[test]
    fn linear_folds_bias_residual_and_epilogue_in() {
        let dev = Device::Cpu;
        for (n, width_in, width_out, bias, residual) in
            [(37, 24, 40, true, true), (5, 16, 6, false, false), (0, 8, 4, true, true), (300, 64, 70, true, false), (9, 16, 80, false, true), (700, 32, 70, true, true)]
        {
            let x = Tensor::randn(0f32, 1.0, (n, width_in), &dev).unwrap();
            let w = Tensor::randn(0f32, 1.0, (width_out, width_in), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, width_out, &dev).unwrap();
            let r = Tensor::randn(0f32, 1.0, (n, width_out), &dev).unwrap();
            let got = linear(&x, &w, bias.then_some(&b), residual.then_some(&r), |xs| xs.iter_mut().for_each(|x| *x = x.max(0.0))).unwrap();
            let mut want = x.matmul(&w.t().unwrap()).unwrap();
            if bias {
                want = want.broadcast_add(&b).unwrap();
            }
            if residual {
                want = (want + &r).unwrap();
            }
            let want = want.relu().unwrap();
            assert_eq!(got.dims(), &[n, width_out]);
            let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).map(|m| m.to_scalar::<f32>().unwrap()).unwrap_or(0.0);
            assert!(diff < 1e-4, "n={n} in={width_in} out={width_out} bias={bias} residual={residual}: {diff}");
        }
        let x = Tensor::zeros((4, 8), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((6, 8), candle_core::DType::F32, &dev).unwrap();
        let r = Tensor::zeros((4, 5), candle_core::DType::F32, &dev).unwrap();
        assert!(linear(&x, &w, None, Some(&r), |_| {}).unwrap_err().to_string().contains("residual"));
        assert!(linear(&x, &w.t().unwrap(), None, None, |_| {}).is_err());
    }

    #[test]
    fn refuses_shapes_that_do_not_make_heads() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((4, 8), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((9, 8), candle_core::DType::F32, &dev).unwrap();
        assert!(project_to_heads(&x, &w, None, 2).unwrap_err().to_string().contains("2 heads"));
        let w = Tensor::zeros((8, 7), candle_core::DType::F32, &dev).unwrap();
        assert!(project_to_heads(&x, &w, None, 2).is_err());
    }
}
