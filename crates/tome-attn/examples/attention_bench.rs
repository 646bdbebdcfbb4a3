//! Attention kernel throughput: `cargo run --release -p tome-attn --example attention_bench
//! [-- SEQ...]`. 8 heads x 64, f32, bidirectional and causal dense attention and a window of
//! 256 each side; prints GFLOP/s counting 4·n·keys·d FLOPs (QKᵀ and PV) over the visible pairs.

use std::time::Instant;

use candle_core::{Device, Tensor};
use tome_attn::{attention, Mask};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seqs: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let seqs = if seqs.is_empty() { vec![4096, 16384] } else { seqs };
    let (h, d) = (8, 64);
    println!("| seq | pattern | seconds | GFLOP/s |");
    println!("|---|---|---|---|");
    for n in seqs {
        let q = Tensor::randn(0f32, 1.0, (h, n, d), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1.0, (h, n, d), &Device::Cpu)?;
        let v = Tensor::randn(0f32, 1.0, (h, n, d), &Device::Cpu)?;
        let pos: Vec<i64> = (0..n as i64).collect();
        let scale = 1.0 / (d as f32).sqrt();
        for (name, causal, window) in [("dense", false, None), ("causal", true, None), ("window 256", false, Some(256usize))] {
            let mask = Mask::full(&pos, &pos).with_causal(causal).with_window(window);
            let pairs: f64 = match (causal, window) {
                (false, None) => (n * n) as f64,
                (true, None) => (n * (n + 1) / 2) as f64,
                (_, Some(w)) => (0..n).map(|i| (i + w).min(n - 1) + 1 - i.saturating_sub(w)).sum::<usize>() as f64,
            };
            attention(&q, &k, &v, &mask, scale)?; // warm-up
            let reps = 3;
            let t = Instant::now();
            for _ in 0..reps {
                attention(&q, &k, &v, &mask, scale)?;
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let flops = 4.0 * pairs * (d * h) as f64;
            println!("| {n} | {name} | {s:.3} | {:.1} |", flops / s / 1e9);
        }
    }
    Ok(())
}
