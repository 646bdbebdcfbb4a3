//! P ranks == 1 rank, for every operator, layout and awkward shard shape; the 1-rank operators
//! against naive references; and the bytes each plan sends, counted exactly.

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tome_attn::{reference, Mask};
use tome_dist::ops::{ring_attention, window_attention, DenseSpec, GlobalTokens, KeyBlock, WindowSpec};
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};

const H: usize = 2;
const D: usize = 6;

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    valid: Vec<bool>,
    global: Option<(Tensor, Tensor, Tensor)>,
}

fn randn(rng: &mut StdRng, n: usize) -> Tensor {
    let data: Vec<f32> = (0..H * n * D).map(|_| rng.random_range(-2.0f32..2.0)).collect();
    Tensor::from_vec(data, (H, n, D), &Device::Cpu).unwrap()
}

fn inputs(n: usize, seed: u64, padded: bool, global_proj: bool) -> Inputs {
    let mut rng = StdRng::seed_from_u64(seed);
    let (q, k, v) = (randn(&mut rng, n), randn(&mut rng, n), randn(&mut rng, n));
    let valid = (0..n).map(|i| !padded || i % 7 != 3).collect();
    let global = global_proj.then(|| (randn(&mut rng, n), randn(&mut rng, n), randn(&mut rng, n)));
    Inputs { q, k, v, valid, global }
}

fn own(x: &Inputs, plan: &ShardPlan, r: usize) -> KeyBlock {
    let pos = plan.positions(r);
    KeyBlock {
        k: plan.shard_of(&x.k, 1, r).unwrap(),
        v: plan.shard_of(&x.v, 1, r).unwrap(),
        valid: pos.iter().map(|&i| x.valid[i as usize]).collect(),
        pos,
    }
}

fn dense(x: &Inputs, plan: &ShardPlan, causal: bool) -> (Tensor, u64) {
    let outs = run_ranks(plan.ranks(), |g: &InProcessGroup| -> tome_dist::Result<_> {
        let r = g.rank();
        let q = plan.shard_of(&x.q, 1, r)?;
        let out = ring_attention(g, &q, &plan.positions(r), own(x, plan, r), DenseSpec { causal, scale: 0.4 })?;
        Ok((out, g.bytes_sent()))
    })
    .unwrap();
    let bytes = outs.iter().map(|o| o.1).sum();
    let shards: Vec<Tensor> = outs.into_iter().map(|o| o.0).collect();
    (plan.unshard(&shards, 1).unwrap(), bytes)
}

fn window(x: &Inputs, plan: &ShardPlan, spec: WindowSpec, globals: &[usize]) -> (Tensor, u64) {
    let outs = run_ranks(plan.ranks(), |g: &InProcessGroup| -> tome_dist::Result<_> {
        let r = g.rank();
        let q = plan.shard_of(&x.q, 1, r)?;
        let projections = match &x.global {
            Some((gq, gk, gv)) => Some((plan.shard_of(gq, 1, r)?, plan.shard_of(gk, 1, r)?, plan.shard_of(gv, 1, r)?)),
            None => None,
        };
        let gt = GlobalTokens { positions: globals.to_vec(), projections };
        let out = window_attention(g, plan, &q, own(x, plan, r), spec, Some(&gt))?;
        Ok((out, g.bytes_sent()))
    })
    .unwrap();
    let bytes = outs.iter().map(|o| o.1).sum();
    let shards: Vec<Tensor> = outs.into_iter().map(|o| o.0).collect();
    (plan.unshard(&shards, 1).unwrap(), bytes)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Plans for `n` tokens over `p` ranks: even, zigzag, and lopsided with empty and tiny shards.
fn plans(n: usize, p: usize) -> Vec<ShardPlan> {
    let mut out = vec![ShardPlan::new(Layout::Contiguous, n, p).unwrap(), ShardPlan::new(Layout::Zigzag, n, p).unwrap()];
    if p > 1 {
        // Rank 0 takes almost everything, the middle ranks one token or none.
        let mut bounds = vec![0, n.saturating_sub(p - 1)];
        for r in 1..p {
            bounds.push((bounds[r] + usize::from(r % 2 == 1)).min(n));
        }
        *bounds.last_mut().unwrap() = n;
        out.push(ShardPlan::from_bounds(&bounds).unwrap());
    }
    out
}

#[test]
fn dense_p_ranks_equal_one_rank() {
    for &n in &[1, 4, 37, 130] {
        for &causal in &[false, true] {
            let x = inputs(n, n as u64, true, false);
            let (one, _) = dense(&x, &ShardPlan::new(Layout::Contiguous, n, 1).unwrap(), causal);
            // One rank against the naive reference.
            let pos: Vec<i64> = (0..n as i64).collect();
            let want = reference::attention(&x.q, &x.k, &x.v, &Mask::full(&pos, &pos).with_causal(causal).with_key_valid(Some(&x.valid)), 0.4).unwrap();
            assert!(max_diff(&one, &want.out) <= 2e-5, "1 rank vs reference, n={n} causal={causal}");
            for p in 1..=5 {
                for plan in plans(n, p) {
                    let (many, _) = dense(&x, &plan, causal);
                    let d = max_diff(&many, &one);
                    assert!(d <= 1e-5, "dense n={n} p={p} causal={causal} plan={plan:?}: diff {d}");
                }
            }
        }
    }
}

/// Longformer attention written out plainly: local tokens see |i-j| <= w (causal: j <= i) and
/// every global key; global tokens see every key through the global projections.
fn naive_window(x: &Inputs, w: usize, causal: bool, globals: &[usize]) -> Tensor {
    let n = x.valid.len();
    let pos: Vec<i64> = (0..n as i64).collect();
    let is_global = |j: usize| globals.contains(&j);
    let (q, k, v) = (x.q.to_vec3::<f32>().unwrap(), x.k.to_vec3::<f32>().unwrap(), x.v.to_vec3::<f32>().unwrap());
    let mut out = vec![0f32; H * n * D];
    for h in 0..H {
        for i in 0..n {
            let (qs, ks, vs) = match (&x.global, is_global(i)) {
                (Some((gq, gk, gv)), true) => (gq.to_vec3::<f32>().unwrap(), gk.to_vec3::<f32>().unwrap(), gv.to_vec3::<f32>().unwrap()),
                _ => (q.clone(), k.clone(), v.clone()),
            };
            let sees = |j: usize| {
                x.valid[j]
                    && if is_global(i) {
                        true
                    } else {
                        is_global(j) || ((!causal || j <= i) && (i as i64 - j as i64).unsigned_abs() as usize <= w)
                    }
            };
            let scores: Vec<f64> = (0..n)
                .map(|j| if sees(j) { 0.4 * (0..D).map(|t| qs[h][i][t] as f64 * ks[h][j][t] as f64).sum::<f64>() } else { f64::NEG_INFINITY })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if m == f64::NEG_INFINITY {
                continue;
            }
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for t in 0..D {
                out[(h * n + i) * D + t] = ((0..n).map(|j| e[j] * vs[h][j][t] as f64).sum::<f64>() / z) as f32;
            }
        }
    }
    let _ = pos;
    Tensor::from_vec(out, (H, n, D), &Device::Cpu).unwrap()
}

#[test]
fn window_p_ranks_equal_one_rank_and_the_naive_reference() {
    for &n in &[1, 5, 23, 90] {
        for &w in &[0, 1, 4, 30, 200] {
            for &causal in &[false, true] {
                let global_sets: &[&[usize]] = if causal { &[&[]] } else { &[&[], &[0], &[2, 3, 17, 60]] };
                for &globals in global_sets {
                    let globals: Vec<usize> = globals.iter().copied().filter(|&g| g < n).collect();
                    for global_proj in [false, true] {
                        if global_proj && globals.is_empty() {
                            continue;
                        }
                        let x = inputs(n, (n * 1000 + w) as u64, n > 20, global_proj);
                        let spec = WindowSpec { one_sided: w, causal, scale: 0.4 };
                        let (one, _) = window(&x, &ShardPlan::new(Layout::Contiguous, n, 1).unwrap(), spec, &globals);
                        let want = naive_window(&x, w, causal, &globals);
                        let d = max_diff(&one, &want);
                        assert!(d <= 2e-5, "window 1 rank vs naive: n={n} w={w} causal={causal} globals={globals:?}: {d}");
                        for p in 2..=5 {
                            for plan in plans(n, p) {
                                let (many, _) = window(&x, &plan, spec, &globals);
                                let d = max_diff(&many, &one);
                                assert!(d <= 1e-5, "window n={n} w={w} p={p} causal={causal} globals={globals:?} plan={plan:?}: {d}");
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn plans_send_exactly_the_bytes_they_need() {
    // Per token: keys and values of 2 heads x 6 dims in f32 (96 bytes), plus one validity byte;
    // the ring also carries each key's position (8 bytes).
    let row = (2 * H * D * 4 + 1) as u64;
    let x = inputs(10, 1, false, false);
    let spec = WindowSpec { one_sided: 3, causal: false, scale: 0.4 };
    // Shards [0,1) [1,2) [2,10), w = 3: rank 0 sends 2 rows, rank 1 sends 2, rank 2 sends 2 + 3.
    let plan = ShardPlan::from_bounds(&[0, 1, 2, 10]).unwrap();
    assert_eq!(window(&x, &plan, spec, &[]).1, 9 * row);
    // Two even halves, w = 2: two rows each way.
    let plan = ShardPlan::from_bounds(&[0, 5, 10]).unwrap();
    assert_eq!(window(&x, &plan, WindowSpec { one_sided: 2, ..spec }, &[]).1, 4 * row);
    // Causal windows only look left: rank 1 sends nothing.
    assert_eq!(window(&x, &plan, WindowSpec { one_sided: 2, causal: true, ..spec }, &[]).1, 2 * row);
    // One rank sends nothing at all.
    assert_eq!(window(&x, &ShardPlan::from_bounds(&[0, 10]).unwrap(), spec, &[]).1, 0);
    // Ring: every rank forwards P-1 blocks; the whole ring carries each block P-1 times.
    let plan = ShardPlan::from_bounds(&[0, 3, 7, 10]).unwrap();
    assert_eq!(dense(&x, &plan, false).1, 2 * 10 * (row + 8));
    // Global token 5 (owned by rank 1 of [0,5) [5,10), w = 0): its key, value, position,
    // validity and query go to rank 0 (96 + 8 + 1 + 48 bytes); then both ranks all-gather the
    // global query's partial, output and lse (48 + 8 bytes each way).
    let plan = ShardPlan::from_bounds(&[0, 5, 10]).unwrap();
    let got = window(&x, &plan, WindowSpec { one_sided: 0, ..spec }, &[5]).1;
    assert_eq!(got, (row + 8 + (H * D * 4) as u64) + 2 * (H * D * 4 + H * 4) as u64);
}

#[test]
fn refusals_and_peer_failures_are_errors() {
    let x = inputs(8, 3, false, false);
    let plan = ShardPlan::new(Layout::Contiguous, 8, 2).unwrap();
    let spec = WindowSpec { one_sided: 2, causal: true, scale: 1.0 };
    let err = run_ranks(2, |g: &InProcessGroup| -> tome_dist::Result<_> {
        let r = g.rank();
        let gt = GlobalTokens { positions: vec![1], projections: None };
        window_attention(g, &plan, &plan.shard_of(&x.q, 1, r)?, own(&x, &plan, r), spec, Some(&gt))
    })
    .unwrap_err();
    assert!(err.to_string().contains("global tokens with causal"), "{err}");
    // A rank that fails makes its peers fail instead of hanging, and the cause is reported.
    let err = run_ranks(3, |g: &InProcessGroup| -> tome_dist::Result<_> {
        if g.rank() == 1 {
            return Err(tome_dist::DistError::Plan("rank 1 failed on purpose".into()));
        }
        let t = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu)?;
        g.all_reduce_sum(&t)
    })
    .unwrap_err();
    assert!(err.to_string().contains("on purpose"), "{err}");
}

#[test]
fn collectives() {
    let got = run_ranks(4, |g: &InProcessGroup| -> tome_dist::Result<_> {
        let t = Tensor::new(&[g.rank() as f32 + 1.0, 10.0], &Device::Cpu)?;
        let sum = g.all_reduce_sum(&t)?.to_vec1::<f32>()?;
        let scan = g.exclusive_scan_sum(&t)?.to_vec1::<f32>()?;
        let parts = (0..4).map(|d| vec![Tensor::new(&[(g.rank() * 10 + d) as f32], &Device::Cpu).unwrap()]).collect();
        let a2a: Vec<f32> = g.all_to_all(parts)?.into_iter().map(|f| f[0].to_vec1::<f32>().unwrap()[0]).collect();
        g.barrier()?;
        Ok((sum, scan, a2a))
    })
    .unwrap();
    for (r, (sum, scan, a2a)) in got.into_iter().enumerate() {
        assert_eq!(sum, vec![10.0, 40.0]);
        let prefix: f32 = (1..=r).map(|x| x as f32).sum();
        assert_eq!(scan, vec![prefix, 10.0 * r as f32]);
        assert_eq!(a2a, (0..4).map(|s| (s * 10 + r) as f32).collect::<Vec<_>>());
    }
    let single = InProcessGroup::single();
    assert_eq!(single.all_gather(vec![]).unwrap().len(), 1);
}
