//! The per-token pieces of a layer on a GPU (`kernels/layers.cu`): embeddings, layer norm, bias
//! with an activation or a residual, heads split out of rows and merged back, partials merged,
//! rows of heads gathered and scattered.
//! Every launcher checks its buffers' lengths against the sizes it is given before launching.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

use crate::device::Gpu;
use crate::error::{driver, GpuError, Result};
use crate::kernels::LAYERS;

/// Threads of the one-block-a-row kernels (`TOME_ROW_THREADS`).
const ROW_THREADS: u32 = 128;
/// Threads per block and the most blocks of the grid-stride kernels.
const THREADS: u32 = 256;
const MAX_BLOCKS: u64 = 1 << 16;

const OP: &str = "gpu layer";

/// The activation folded into a bias add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity = 0,
    /// GELU with erf, exact (`gelu`).
    Gelu = 1,
    /// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh = 2,
    Relu = 3,
}

/// The kernels of `layers.cu`, loaded on one GPU.
pub struct Layers {
    stream: Arc<CudaStream>,
    embed: CudaFunction,
    layer_norm: CudaFunction,
    rms_norm: CudaFunction,
    rope: CudaFunction,
    silu_mul: CudaFunction,
    to_bf16: CudaFunction,
    round_bf16: CudaFunction,
    to_f16: CudaFunction,
    round_f16: CudaFunction,
    bias_activation: CudaFunction,
    bias_residual: CudaFunction,
    split_heads: CudaFunction,
    merge_heads: CudaFunction,
    merge_partials: CudaFunction,
    copy_rows: CudaFunction,
}

fn expect(name: &str, have: usize, want: usize) -> Result<()> {
    if have == want {
        Ok(())
    } else {
        Err(GpuError::Shape { op: OP, msg: format!("{name} holds {have} elements where {want} are needed") })
    }
}

fn i32_of(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| GpuError::Shape { op: OP, msg: format!("{what} {n}: past the kernels' 32-bit sizes") })
}

/// A grid-stride launch over `total` elements.
fn spread(total: usize) -> LaunchConfig {
    let blocks = (total as u64).div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row.
fn per_row(rows: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (u32::try_from(rows).map_err(|_| GpuError::Shape { op: OP, msg: format!("{rows} rows in one launch") })?, 1, 1),
        block_dim: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Layers {
    /// The kernels on `gpu`, launched on `stream`.
    pub fn new(gpu: &Gpu, stream: Arc<CudaStream>) -> Result<Self> {
        let module = gpu.load(&LAYERS)?;
        let f = |name: &str| module.load_function(name).map_err(driver("cuModuleGetFunction"));
        Ok(Layers {
            stream,
            embed: f("tome_embed")?,
            layer_norm: f("tome_layer_norm")?,
            rms_norm: f("tome_rms_norm")?,
            rope: f("tome_rope")?,
            silu_mul: f("tome_silu_mul")?,
            to_bf16: f("tome_to_bf16")?,
            round_bf16: f("tome_round_bf16")?,
            to_f16: f("tome_to_f16")?,
            round_f16: f("tome_round_f16")?,
            bias_activation: f("tome_bias_activation")?,
            bias_residual: f("tome_bias_residual")?,
            split_heads: f("tome_split_heads")?,
            merge_heads: f("tome_merge_heads")?,
            merge_partials: f("tome_merge_partials")?,
            copy_rows: f("tome_copy_rows")?,
        })
    }

    /// `out[i] = word[ids[i]] · word_scale + position[position_ids[i]] + token_type[0]`, `out`
    /// `[n, hidden]`. Ids and positions are checked against the tables here, on the host.
    #[allow(clippy::too_many_arguments)]
    pub fn embed(
        &self,
        ids: &[u32],
        position_ids: &[u32],
        word: &CudaSlice<f32>,
        position: &CudaSlice<f32>,
        token_type: &CudaSlice<f32>,
        word_scale: f32,
        hidden: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = ids.len();
        expect("position ids", position_ids.len(), n)?;
        expect("out", out.len(), n * hidden)?;
        if hidden == 0 || token_type.len() < hidden {
            return Err(GpuError::Shape { op: OP, msg: format!("a token type table of {} values for width {hidden}", token_type.len()) });
        }
        for (name, table, rows) in [("token id", word, ids), ("position id", position, position_ids)] {
            let limit = table.len() / hidden;
            if let Some((i, bad)) = rows.iter().enumerate().find(|(_, &r)| r as usize >= limit) {
                return Err(GpuError::Shape { op: OP, msg: format!("{name} {bad} at row {i} is past the table's {limit} rows") });
            }
        }
        if n == 0 {
            return Ok(());
        }
        let ids = self.stream.clone_htod(ids).map_err(driver("copy ids"))?;
        let position_ids = self.stream.clone_htod(position_ids).map_err(driver("copy position ids"))?;
        let (n32, h32) = (i32_of("rows", n)?, i32_of("width", hidden)?);
        let mut args = self.stream.launch_builder(&self.embed);
        args.arg(&ids).arg(&position_ids).arg(word).arg(position).arg(token_type).arg(&word_scale).arg(&n32).arg(&h32).arg(out);
        // SAFETY: arguments as `tome_embed` takes them; every id and position was checked against
        // its table and `out` holds n · hidden values.
        unsafe { args.launch(per_row(n)?) }.map_err(driver("tome_embed"))?;
        Ok(())
    }

    /// Layer norm of each row of `x` (`[rows, cols]`) into `out`.
    pub fn layer_norm(&self, x: &CudaSlice<f32>, gamma: &CudaSlice<f32>, beta: &CudaSlice<f32>, cols: usize, eps: f32, out: &mut CudaSlice<f32>) -> Result<()> {
        expect("gamma", gamma.len(), cols)?;
        expect("beta", beta.len(), cols)?;
        expect("out", out.len(), x.len())?;
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(GpuError::Shape { op: OP, msg: format!("{} values are not rows of {cols}", x.len()) });
        }
        let rows = x.len() / cols;
        if rows == 0 {
            return Ok(());
        }
        let (n32, c32) = (i32_of("rows", rows)?, i32_of("width", cols)?);
        let mut args = self.stream.launch_builder(&self.layer_norm);
        args.arg(x).arg(gamma).arg(beta).arg(&n32).arg(&c32).arg(&eps).arg(out);
        // SAFETY: arguments as `tome_layer_norm` takes them; lengths checked above.
        unsafe { args.launch(per_row(rows)?) }.map_err(driver("tome_layer_norm"))?;
        Ok(())
    }

    /// RMS norm of each row of `x` (`[rows, gamma.len()]`) into `out`.
    pub fn rms_norm(&self, x: &CudaSlice<f32>, gamma: &CudaSlice<f32>, eps: f32, out: &mut CudaSlice<f32>) -> Result<()> {
        let cols = gamma.len();
        expect("out", out.len(), x.len())?;
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(GpuError::Shape { op: OP, msg: format!("{} values are not rows of {cols}", x.len()) });
        }
        let rows = x.len() / cols;
        if rows == 0 {
            return Ok(());
        }
        let (n32, c32) = (i32_of("rows", rows)?, i32_of("width", cols)?);
        let mut args = self.stream.launch_builder(&self.rms_norm);
        args.arg(x).arg(gamma).arg(&n32).arg(&c32).arg(&eps).arg(out);
        // SAFETY: arguments as `tome_rms_norm` takes them; lengths checked above.
        unsafe { args.launch(per_row(rows)?) }.map_err(driver("tome_rms_norm"))?;
        Ok(())
    }

    /// Rotary positions in place on heads `[heads, n, d]`, from `cos` and `sin` `[n, d]`.
    pub fn rope(&self, x: &mut CudaSlice<f32>, cos: &CudaSlice<f32>, sin: &CudaSlice<f32>, heads: usize, n: usize, d: usize) -> Result<()> {
        expect("heads", x.len(), heads * n * d)?;
        expect("cos", cos.len(), n * d)?;
        expect("sin", sin.len(), n * d)?;
        if !d.is_multiple_of(2) {
            return Err(GpuError::Shape { op: OP, msg: format!("rotary positions need an even head size, not {d}") });
        }
        if x.is_empty() {
            return Ok(());
        }
        let (h32, n32, d32) = (i32_of("heads", heads)?, i32_of("rows", n)?, i32_of("head size", d)?);
        let mut args = self.stream.launch_builder(&self.rope);
        args.arg(&mut *x).arg(cos).arg(sin).arg(&h32).arg(&n32).arg(&d32);
        // SAFETY: arguments as `tome_rope` takes them; lengths checked above.
        unsafe { args.launch(spread(heads * n * d / 2)) }.map_err(driver("tome_rope"))?;
        Ok(())
    }

    /// `gate = silu(gate) · up`.
    pub fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<()> {
        expect("up", up.len(), gate.len())?;
        if gate.is_empty() {
            return Ok(());
        }
        let total = gate.len() as i64;
        let config = spread(gate.len());
        let mut args = self.stream.launch_builder(&self.silu_mul);
        args.arg(&mut *gate).arg(up).arg(&total);
        // SAFETY: arguments as `tome_silu_mul` takes them; both buffers hold `total` values.
        unsafe { args.launch(config) }.map_err(driver("tome_silu_mul"))?;
        Ok(())
    }

    /// `y = bf16(x)` as bits (nearest even; tome-attn's rounding, bit for bit).
    pub fn to_bf16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>) -> Result<()> {
        self.to_half(&self.to_bf16, "tome_to_bf16", x, y)
    }

    /// `x = bf16(x)`, kept in f32.
    pub fn round_bf16(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        self.round_half(&self.round_bf16, "tome_round_bf16", x)
    }

    /// `y = f16(x)` as bits (nearest even, overflow to infinity; `half::f16::from_f32`, bit for
    /// bit).
    pub fn to_f16(&self, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>) -> Result<()> {
        self.to_half(&self.to_f16, "tome_to_f16", x, y)
    }

    /// `x = f16(x)`, kept in f32.
    pub fn round_f16(&self, x: &mut CudaSlice<f32>) -> Result<()> {
        self.round_half(&self.round_f16, "tome_round_f16", x)
    }

    fn to_half(&self, kernel: &CudaFunction, name: &'static str, x: &CudaSlice<f32>, y: &mut CudaSlice<u16>) -> Result<()> {
        expect("16-bit output", y.len(), x.len())?;
        if x.is_empty() {
            return Ok(());
        }
        let n = x.len() as i64;
        let mut args = self.stream.launch_builder(kernel);
        args.arg(x).arg(&mut *y).arg(&n);
        // SAFETY: arguments as `tome_to_bf16` and `tome_to_f16` take them; both buffers hold n
        // values.
        unsafe { args.launch(spread(x.len())) }.map_err(driver(name))?;
        Ok(())
    }

    fn round_half(&self, kernel: &CudaFunction, name: &'static str, x: &mut CudaSlice<f32>) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let (n, config) = (x.len() as i64, spread(x.len()));
        let mut args = self.stream.launch_builder(kernel);
        args.arg(&mut *x).arg(&n);
        // SAFETY: arguments as `tome_round_bf16` and `tome_round_f16` take them.
        unsafe { args.launch(config) }.map_err(driver(name))?;
        Ok(())
    }

    /// `x = act(x + bias)` over rows of `bias.len()` columns.
    pub fn bias_activation(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, act: Activation) -> Result<()> {
        let cols = bias.len();
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(GpuError::Shape { op: OP, msg: format!("{} values are not rows of {cols}", x.len()) });
        }
        let (rows, c32, act) = ((x.len() / cols) as i64, i32_of("width", cols)?, act as i32);
        let config = spread(x.len());
        let mut args = self.stream.launch_builder(&self.bias_activation);
        args.arg(&mut *x).arg(bias).arg(&rows).arg(&c32).arg(&act);
        // SAFETY: arguments as `tome_bias_activation` takes them; `x` is whole rows of `bias`.
        unsafe { args.launch(config) }.map_err(driver("tome_bias_activation"))?;
        Ok(())
    }

    /// `x = x + bias + residual` over rows of `bias.len()` columns.
    pub fn bias_residual(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, residual: &CudaSlice<f32>) -> Result<()> {
        let cols = bias.len();
        expect("residual", residual.len(), x.len())?;
        if cols == 0 || !x.len().is_multiple_of(cols) {
            return Err(GpuError::Shape { op: OP, msg: format!("{} values are not rows of {cols}", x.len()) });
        }
        let (rows, c32) = ((x.len() / cols) as i64, i32_of("width", cols)?);
        let config = spread(x.len());
        let mut args = self.stream.launch_builder(&self.bias_residual);
        args.arg(&mut *x).arg(bias).arg(residual).arg(&rows).arg(&c32);
        // SAFETY: arguments as `tome_bias_residual` takes them; lengths checked above.
        unsafe { args.launch(config) }.map_err(driver("tome_bias_residual"))?;
        Ok(())
    }

    /// Rows `[n, heads · d]` into heads `[heads, n, d]`.
    pub fn split_heads(&self, rows: &CudaSlice<f32>, n: usize, heads: usize, d: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        self.split_heads_at(rows, n, heads, d, heads * d, 0, out)
    }

    /// Columns `offset .. offset + heads · d` of rows `[n, stride]` into heads `[heads, n, d]`
    /// (one of a fused q/k/v projection's parts).
    #[allow(clippy::too_many_arguments)]
    pub fn split_heads_at(&self, rows: &CudaSlice<f32>, n: usize, heads: usize, d: usize, stride: usize, offset: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        expect("rows", rows.len(), n * stride)?;
        expect("heads", out.len(), n * heads * d)?;
        if offset + heads * d > stride {
            return Err(GpuError::Shape { op: OP, msg: format!("columns {offset}..{} of rows {stride} wide", offset + heads * d) });
        }
        if out.is_empty() {
            return Ok(());
        }
        let (n32, h32, d32, s32, o32) = (i32_of("rows", n)?, i32_of("heads", heads)?, i32_of("head size", d)?, i32_of("row width", stride)?, i32_of("column", offset)?);
        let mut args = self.stream.launch_builder(&self.split_heads);
        args.arg(rows).arg(&n32).arg(&h32).arg(&d32).arg(&s32).arg(&o32).arg(out);
        // SAFETY: arguments as `tome_split_heads` takes them; `rows` holds n rows of `stride`,
        // the columns lie within them and `out` holds n · heads · d values.
        unsafe { args.launch(spread(n * heads * d)) }.map_err(driver("tome_split_heads"))?;
        Ok(())
    }

    /// Heads `[heads, n, d]` back into rows `[n, heads · d]`.
    pub fn merge_heads(&self, heads_in: &CudaSlice<f32>, n: usize, heads: usize, d: usize, rows: &mut CudaSlice<f32>) -> Result<()> {
        expect("heads", heads_in.len(), n * heads * d)?;
        expect("rows", rows.len(), n * heads * d)?;
        if rows.is_empty() {
            return Ok(());
        }
        let (n32, h32, d32) = (i32_of("rows", n)?, i32_of("heads", heads)?, i32_of("head size", d)?);
        let mut args = self.stream.launch_builder(&self.merge_heads);
        args.arg(heads_in).arg(&n32).arg(&h32).arg(&d32).arg(rows);
        // SAFETY: arguments as `tome_merge_heads` takes them; both buffers hold n · heads · d values.
        unsafe { args.launch(spread(n * heads * d)) }.map_err(driver("tome_merge_heads"))?;
        Ok(())
    }

    /// Merges the partial `(out, lse)` into the accumulator `(acc_out, acc_lse)`: the same queries
    /// over disjoint keys, rows of `d` values.
    pub fn merge_partials(&self, acc_out: &mut CudaSlice<f32>, acc_lse: &mut CudaSlice<f32>, out: &CudaSlice<f32>, lse: &CudaSlice<f32>, d: usize) -> Result<()> {
        let rows = acc_lse.len();
        expect("lse", lse.len(), rows)?;
        expect("accumulated out", acc_out.len(), rows * d)?;
        expect("out", out.len(), rows * d)?;
        if rows == 0 {
            return Ok(());
        }
        let (rows64, d32) = (rows as i64, i32_of("width", d)?);
        let mut args = self.stream.launch_builder(&self.merge_partials);
        args.arg(acc_out).arg(acc_lse).arg(out).arg(lse).arg(&rows64).arg(&d32);
        // SAFETY: arguments as `tome_merge_partials` takes them; lengths checked above.
        unsafe { args.launch(spread(rows)) }.map_err(driver("tome_merge_partials"))?;
        Ok(())
    }

    /// `dst[h, dst_rows[i]] = src[h, src_rows[i]]` for every head, rows of `d` values: `src`
    /// `[heads, src.len() / (heads · d), d]`, `dst` likewise. Every index is checked here, on the
    /// host, and `dst_rows` may name a row only once.
    pub fn copy_rows(&self, src: &CudaSlice<f32>, src_rows: &[u32], dst: &mut CudaSlice<f32>, dst_rows: &[u32], heads: usize, d: usize) -> Result<()> {
        let m = src_rows.len();
        expect("destination rows", dst_rows.len(), m)?;
        let width = heads * d;
        if width == 0 || !src.len().is_multiple_of(width) || !dst.len().is_multiple_of(width) {
            return Err(GpuError::Shape { op: OP, msg: format!("buffers of {} and {} values are not {heads} heads of rows of {d}", src.len(), dst.len()) });
        }
        let (src_n, dst_n) = (src.len() / width, dst.len() / width);
        for (name, rows, n) in [("source", src_rows, src_n), ("destination", dst_rows, dst_n)] {
            if let Some(bad) = rows.iter().find(|&&r| r as usize >= n) {
                return Err(GpuError::Shape { op: OP, msg: format!("{name} row {bad} of {n}") });
            }
        }
        let mut seen = vec![false; dst_n];
        if let Some(twice) = dst_rows.iter().find(|&&r| std::mem::replace(&mut seen[r as usize], true)) {
            return Err(GpuError::Shape { op: OP, msg: format!("destination row {twice} named twice") });
        }
        if m == 0 {
            return Ok(());
        }
        let to_i32 = |rows: &[u32]| rows.iter().map(|&r| r as i32).collect::<Vec<i32>>();
        let src_idx = self.stream.clone_htod(&to_i32(src_rows)).map_err(driver("copy row indices"))?;
        let dst_idx = self.stream.clone_htod(&to_i32(dst_rows)).map_err(driver("copy row indices"))?;
        let (sn, dn, h32, m32, d32) = (i32_of("rows", src_n)?, i32_of("rows", dst_n)?, i32_of("heads", heads)?, i32_of("rows", m)?, i32_of("width", d)?);
        let mut args = self.stream.launch_builder(&self.copy_rows);
        args.arg(src).arg(&sn).arg(&src_idx).arg(&mut *dst).arg(&dn).arg(&dst_idx).arg(&h32).arg(&m32).arg(&d32);
        // SAFETY: arguments as `tome_copy_rows` takes them; every index lies within its buffer's
        // rows and no destination row is written twice.
        unsafe { args.launch(spread(m * width)) }.map_err(driver("tome_copy_rows"))?;
        Ok(())
    }
}
