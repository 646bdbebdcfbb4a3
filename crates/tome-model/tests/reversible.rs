//! Reversible layers whose attention is a sequence-parallel operator: the two-stream forward is
//! rank-invariant, and the inverse recovers the inputs.

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tome_dist::ops::{window_attention, KeyBlock, WindowSpec};
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::reversible::{forward, inverse};

const HEADS: usize = 2;
const HD: usize = 4;

fn stream(n: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    Tensor::from_vec((0..n * HEADS * HD).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>(), (n, HEADS * HD), &Device::Cpu).unwrap()
}

/// Two reversible layers on this rank's shard: f = window attention (q = k = v = the stream,
/// split into heads), g = tanh.
fn layers(g: &InProcessGroup, plan: &ShardPlan, x1: Tensor, x2: Tensor) -> tome_model::Result<(Tensor, Tensor, Tensor, Tensor)> {
    let pos = plan.positions(g.rank());
    let mut f = |x: &Tensor| -> tome_model::Result<Tensor> {
        let n = x.dim(0)?;
        let h = x.reshape((n, HEADS, HD))?.transpose(0, 1)?.contiguous()?;
        let own = KeyBlock { k: h.clone(), v: h.clone(), pos: pos.clone(), valid: vec![true; n] };
        let out = window_attention(g, plan, &h, own, WindowSpec { one_sided: 3, causal: false, scale: 0.5, precision: tome_attn::Precision::F32 }, None)?;
        Ok(out.transpose(0, 1)?.reshape((n, HEADS * HD))?)
    };
    let mut gg = |x: &Tensor| -> tome_model::Result<Tensor> { Ok(x.tanh()?) };
    let (a1, a2) = forward(&x1, &x2, &mut f, &mut gg)?;
    let (y1, y2) = forward(&a1, &a2, &mut f, &mut gg)?;
    let (b1, b2) = inverse(&y1, &y2, &mut f, &mut gg)?;
    let (r1, r2) = inverse(&b1, &b2, &mut f, &mut gg)?;
    Ok((y1, y2, r1, r2))
}

#[test]
fn reversible_layers_are_rank_invariant_and_invertible() {
    let n = 37;
    let (x1, x2) = (stream(n, 1), stream(n, 2));
    let run = |p: usize| {
        let plan = ShardPlan::new(Layout::Contiguous, n, p).unwrap();
        let outs = run_ranks(p, |g: &InProcessGroup| layers(g, &plan, plan.shard_of(&x1, 0, g.rank())?, plan.shard_of(&x2, 0, g.rank())?)).unwrap();
        let cat = |i: usize| {
            let parts: Vec<Tensor> = outs.iter().map(|o| [&o.0, &o.1, &o.2, &o.3][i].clone()).collect();
            plan.unshard(&parts, 0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        (cat(0), cat(1), cat(2), cat(3))
    };
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let one = run(1);
    let x1v = x1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let x2v = x2.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(diff(&one.2, &x1v) < 1e-5 && diff(&one.3, &x2v) < 1e-5, "the inverse recovers the inputs");
    assert!(diff(&one.0, &x1v) > 1e-2, "the layers do something");
    for p in 2..=5 {
        let many = run(p);
        assert!(diff(&many.0, &one.0) <= 1e-5 && diff(&many.1, &one.1) <= 1e-5, "p={p}");
    }
}
