//! The GPU cases of `tome bench` (scripts/gpu-check.sh runs them beside PyTorch on the same
//! GPU): `gpu-dense` (f32, CUDA cores) and `gpu-dense-bf16` (bf16 operands on tensor cores, as
//! bf16 runs attend), attention alone as SDPA sees it (8 heads × 64, every key visible); `gpu-longformer`, a Longformer self-attention layer without global tokens as
//! transformers' `LongformerSelfAttention` computes it (hidden 512, projections and window
//! attention of one-sided width 256, f32); `gpu-book`, the whole-book job on the GPU. Each is
//! run once to warm up (kernels compiled, memory allocated), then the best of 3 timed runs is
//! reported, the stream synchronised inside each. GPU `TOME_BENCH_GPU` (default 0).

use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use cudarc::driver::CudaSlice;
use rand::Rng;
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_gpu::attention::{Dims, Inputs};
use tome_gpu::blas::{Blas, Half};
use tome_gpu::layers::{Activation, Layers};
use tome_gpu::{Gpu, GpuAttention};
use tome_model::gpu::GpuRank;
use tome_model::{pool_spans, EncodeOptions, LayerAttention, ModelDir, PositionExtension};

use super::memory::peak_mb;
use super::Record;

const HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const HIDDEN: usize = HEADS * HEAD_DIM;
const RUNS: usize = 3;

fn gpu_index() -> usize {
    std::env::var("TOME_BENCH_GPU").ok().and_then(|g| g.parse().ok()).unwrap_or(0)
}

/// Warm-up, then the fastest of [`RUNS`] runs of `f`.
fn best_of(case: &str, tokens: usize, gflop: Option<f64>, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Record> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..RUNS {
        let started = Instant::now();
        f()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(Record { case: case.into(), tokens, seconds: best, gflops: gflop.map(|g| g / best), fma_peak_gflops: None, peak_increment_mb: 0.0, peak_rss_mb: peak_mb() })
}

fn random(len: usize) -> Vec<f32> {
    let mut rng = rand::rng();
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn upload<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, values: &[T]) -> anyhow::Result<CudaSlice<T>> {
    gpu.stream().clone_htod(values).context("copying to the GPU")
}

pub fn run(name: &str, n: usize) -> anyhow::Result<Record> {
    match name {
        "gpu-dense" | "gpu-dense-bf16" => dense(name, n),
        "gpu-longformer" => longformer(name, n),
        "gpu-book" => book(name),
        other => bail!("unknown bench case {other} (GPU cases: gpu-dense, gpu-dense-bf16, gpu-longformer, gpu-book)"),
    }
}

fn dense(name: &str, n: usize) -> anyhow::Result<Record> {
    let gpu = Gpu::open(gpu_index())?;
    let stream = gpu.stream();
    let attention = GpuAttention::new(&gpu, stream.clone())?;
    let pos: Vec<i64> = (0..n as i64).collect();
    let (q_pos, k_pos) = (upload(&gpu, &pos)?, upload(&gpu, &pos)?);
    let dims = Dims { heads: HEADS, kv_heads: HEADS, queries: n, keys: n, head_dim: HEAD_DIM, value_dim: HEAD_DIM };
    let mut out = stream.alloc_zeros::<f32>(HEADS * n * HEAD_DIM)?;
    let mut lse = stream.alloc_zeros::<f32>(HEADS * n)?;
    let gflop = Some(4.0 * (n * n) as f64 * HIDDEN as f64 / 1e9);
    let len = HEADS * n * HEAD_DIM;
    if name == "gpu-dense-bf16" {
        let bf16 = |v: Vec<f32>| -> Vec<u16> { v.into_iter().map(|x| half::bf16::from_f32(x).to_bits()).collect() };
        let (q, k, v) = (upload(&gpu, &bf16(random(len)))?, upload(&gpu, &bf16(random(len)))?, upload(&gpu, &bf16(random(len)))?);
        let inputs = Inputs { q: &q, k: &k, v: &v, q_pos: &q_pos, k_pos: &k_pos, key_valid: None, causal: false, window: None, scale: 0.125 };
        best_of(name, n, gflop, || {
            attention.launch_tensor_cores(dims, &inputs, Half::Bf16, &mut out, &mut lse)?;
            Ok(stream.synchronize()?)
        })
    } else {
        let (q, k, v) = (upload(&gpu, &random(len))?, upload(&gpu, &random(len))?, upload(&gpu, &random(len))?);
        let inputs = Inputs { q: &q, k: &k, v: &v, q_pos: &q_pos, k_pos: &k_pos, key_valid: None, causal: false, window: None, scale: 0.125 };
        best_of(name, n, gflop, || {
            attention.launch(dims, &inputs, &mut out, &mut lse)?;
            Ok(stream.synchronize()?)
        })
    }
}

/// Projections (q, k, v with bias), window attention, the heads merged back into `[n, 512]`.
fn longformer(name: &str, n: usize) -> anyhow::Result<Record> {
    let gpu = Gpu::open(gpu_index())?;
    let stream = gpu.stream();
    let (attention, layers, blas) = (GpuAttention::new(&gpu, stream.clone())?, Layers::new(&gpu, stream.clone())?, Blas::new(stream.clone())?);
    let x = upload(&gpu, &random(n * HIDDEN))?;
    let weights: Vec<(CudaSlice<f32>, CudaSlice<f32>)> =
        (0..3).map(|_| Ok((upload(&gpu, &random(HIDDEN * HIDDEN))?, upload(&gpu, &random(HIDDEN))?))).collect::<anyhow::Result<_>>()?;
    let pos: Vec<i64> = (0..n as i64).collect();
    let pos = upload(&gpu, &pos)?;
    let mut rows = stream.alloc_zeros::<f32>(n * HIDDEN)?;
    let mut heads: Vec<CudaSlice<f32>> = (0..3).map(|_| stream.alloc_zeros::<f32>(n * HIDDEN)).collect::<Result<_, _>>()?;
    let mut out = stream.alloc_zeros::<f32>(n * HIDDEN)?;
    let mut lse = stream.alloc_zeros::<f32>(HEADS * n)?;
    let mut context = stream.alloc_zeros::<f32>(n * HIDDEN)?;
    let dims = Dims { heads: HEADS, kv_heads: HEADS, queries: n, keys: n, head_dim: HEAD_DIM, value_dim: HEAD_DIM };
    let gflop = Some((3.0 * 2.0 * (n * HIDDEN * HIDDEN) as f64 + 4.0 * (n * 513) as f64 * HIDDEN as f64) / 1e9);
    best_of(name, n, gflop, || {
        for ((w, b), h) in weights.iter().zip(heads.iter_mut()) {
            blas.linear(&x, w, HIDDEN, HIDDEN, &mut rows)?;
            layers.bias_activation(&mut rows, b, Activation::Identity)?;
            layers.split_heads(&rows, n, HEADS, HEAD_DIM, h)?;
        }
        let inputs = Inputs { q: &heads[0], k: &heads[1], v: &heads[2], q_pos: &pos, k_pos: &pos, key_valid: None, causal: false, window: Some(256), scale: 0.125 };
        attention.launch(dims, &inputs, &mut out, &mut lse)?;
        layers.merge_heads(&out, n, HEADS, HEAD_DIM, &mut context)?;
        Ok(stream.synchronize()?)
    })
}

/// The whole book (Paradise Lost) through MiniLM on the GPU: window attention (512), document
/// and 256-token chunk embeddings, tokenising included, as `tome process --device cuda` runs
/// it. The model is `TOME_BENCH_BOOK_MODEL` (default data/models/all-MiniLM-L6-v2), the ranks
/// `TOME_BENCH_BOOK_RANKS` (default 1), all on one GPU.
fn book(name: &str) -> anyhow::Result<Record> {
    let data = std::env::var("TOME_DATA_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("data"));
    let model = std::env::var("TOME_BENCH_BOOK_MODEL").map(PathBuf::from).unwrap_or_else(|_| data.join("models/all-MiniLM-L6-v2"));
    let dir = ModelDir::open(&model).with_context(|| format!("the book case's model at {}", model.display()))?;
    let text = std::fs::read_to_string(data.join("books/plrabn12.txt")).context("the book case needs data/books/plrabn12.txt")?;
    let tokenizer = dir.tokenizer.as_ref().context("the book case's model needs a tokenizer")?;
    let ranks: usize = std::env::var("TOME_BENCH_BOOK_RANKS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let index = gpu_index();
    let mut tokens = 0;
    let record = best_of(name, 0, None, || {
        let ids = tokenizer.encode(&text)?.ids;
        let n = ids.len();
        tokens = n;
        let opts = EncodeOptions { attention: Some(LayerAttention::window(512)?), position_extension: PositionExtension::Tile, ..Default::default() };
        let doc = dir.model.prepare(ids, &opts)?;
        let plan = ShardPlan::new(Layout::Contiguous, n, ranks)?;
        let mut spans: Vec<Range<usize>> = std::iter::once(0..n).collect();
        spans.extend((0..n).step_by(256).map(|s| s..(s + 256).min(n)));
        run_ranks(ranks, |g: &InProcessGroup| -> tome_model::Result<candle_core::Tensor> {
            let rank = GpuRank::lease(index)?;
            let h = dir.model.forward_on(Some(&rank), g, &plan, &doc.shard(&plan, g.rank()), &mut |_| true)?;
            pool_spans(g, &plan, &h, &spans, dir.pooling)
        })?;
        Ok(())
    })?;
    Ok(Record { tokens, ..record })
}
