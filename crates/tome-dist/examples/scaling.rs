//! Length scaling of the linear-cost families on one rank:
//! `cargo run --release -p tome-dist --example scaling -- FAMILY TOKENS` prints one JSON line
//! with the seconds the operator took and the process's peak RSS. Families: window,
//! blocksparse, local, favor, favor-causal, recurrent, compressive. Tiny dimensions (2 heads × 16);
//! scripts/bench/scaling.sh runs every family at 64k, 256k and 1M tokens and fits the exponent.

use std::time::Instant;

use candle_core::{Device, Tensor};
use tome_attn::blocksparse::{BlockSparsePlan, RandomBlocks};
use tome_attn::favor::orthogonal_projection;
use tome_attn::relative::{segment_attention, sinusoid};
use tome_dist::ops::{
    blocksparse_attention, favor_attention, segment_recurrence, window_attention, Compression, CompressiveMemory, FavorSpec, KeyBlock, WindowSpec, XlMemory,
};
use tome_dist::{InProcessGroup, Layout, ShardPlan};

const HEADS: usize = 2;
const D: usize = 16;

fn randn(shape: (usize, usize, usize)) -> candle_core::Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|kb| kb.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

fn heads(t: &Tensor) -> candle_core::Result<Tensor> {
    let n = t.dim(0)?;
    t.reshape((n, HEADS, D))?.transpose(0, 1)?.contiguous()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (family, n) = match (args.get(1), args.get(2).and_then(|n| n.parse::<usize>().ok())) {
        (Some(f), Some(n)) => (f.clone(), n),
        _ => return Err("usage: scaling FAMILY TOKENS".into()),
    };
    let g = InProcessGroup::single();
    let plan = ShardPlan::new(Layout::Contiguous, n, 1)?;
    let pos: Vec<i64> = (0..n as i64).collect();
    let (q, k, v) = (randn((HEADS, n, D))?, randn((HEADS, n, D))?, randn((HEADS, n, D))?);
    let own = KeyBlock { k: k.clone(), v: v.clone(), pos: pos.clone(), valid: vec![true; n] };
    let width = HEADS * D;
    let w = || Tensor::randn(0f32, (width as f32).powf(-0.5), (width, width), &Device::Cpu);
    let started = Instant::now();
    match family.as_str() {
        "window" => drop(window_attention(&g, &plan, &q, own, WindowSpec { one_sided: 128, causal: false, scale: 0.25 }, None)?),
        "blocksparse" | "blocksparse-eval" => {
            // Seeded random blocks (distinct per head), or Hugging Face's eval plan (block 0).
            let random = if family == "blocksparse" { RandomBlocks::Seeded { r: 3, seed: 1 } } else { RandomBlocks::AllZero(3) };
            let pattern = BlockSparsePlan::new(n, 64, HEADS, &random)?;
            drop(blocksparse_attention(&g, &plan, &q, own, &pattern, 0.25)?)
        }
        "local" => {
            let pattern = BlockSparsePlan::local(n, 64, HEADS, 1, 0, false)?;
            drop(blocksparse_attention(&g, &plan, &q, own, &pattern, 0.25)?)
        }
        "favor" | "favor-causal" => {
            let spec = FavorSpec { projection: orthogonal_projection(32, D, 1)?, causal: family == "favor-causal", chunk: 256, rows: 16384 };
            drop(favor_attention(&g, &plan, &q, &k, &v, &spec)?)
        }
        "recurrent" | "compressive" => {
            let x = Tensor::randn(0f32, 1.0, (n, width), &Device::Cpu)?;
            let (wq, wk, wv, wr) = (w()?, w()?, w()?, w()?);
            let (u, vb) = (randn((1, HEADS, D))?.squeeze(0)?, randn((1, HEADS, D))?.squeeze(0)?);
            let attend = |memory: &Tensor, seg: &Tensor| -> tome_dist::Result<Tensor> {
                let all = Tensor::cat(&[memory, seg], 0)?;
                let r = heads(&sinusoid(all.dim(0)?, width)?.matmul(&wr)?)?;
                let p = segment_attention(&heads(&seg.matmul(&wq)?)?, &heads(&all.matmul(&wk)?)?, &heads(&all.matmul(&wv)?)?, &r, &u, &vb, 1000)?;
                Ok(p.out.transpose(0, 1)?.reshape((seg.dim(0)?, width))?)
            };
            let seg_plan = ShardPlan::aligned(n, 1, 128)?;
            if family == "recurrent" {
                let first = XlMemory::empty(128, width)?;
                drop(segment_recurrence(&g, &seg_plan, &x, 128, &first, &|m: &XlMemory, s: &Tensor| attend(&m.mem, s))?)
            } else {
                let first = CompressiveMemory::empty(128, 64, 2, Compression::Mean, width)?;
                drop(segment_recurrence(&g, &seg_plan, &x, 128, &first, &|m: &CompressiveMemory, s: &Tensor| attend(&Tensor::cat(&[&m.cmem, &m.mem], 0)?, s))?)
            }
        }
        other => return Err(format!("unknown family {other}").into()),
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("{{\"family\": \"{family}\", \"tokens\": {n}, \"seconds\": {seconds:.4}, \"peak_rss_mb\": {:.1}}}", peak_rss_mb());
    Ok(())
}
