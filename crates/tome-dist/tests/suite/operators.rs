//! The operator suite, run by every Group backend: P ranks == 1 rank, for every operator,
//! layout and awkward shard shape; the 1-rank operators against naive references; and the bytes
//! each plan sends, counted exactly. The including test crate provides `launch`, which runs a
//! closure on each rank of a new group of its backend, `available`, which says whether the
//! backend can run here at all, and `max_ranks`, the most ranks it can run here (NCCL: one per
//! GPU present). Cases that need more ranks than that are left out, and the test says so on
//! stderr; a test whose every case needs more returns at once, saying so too.

use std::ops::{Range, RangeInclusive};

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use tome_attn::{reference, Mask, Precision};
use tome_dist::ops::{
    ring_attention, window_attention, window_key_stream, window_keys, window_margins, DenseSpec, GlobalTokens, HeadRows, KeyBlock, KeyShape, KeysOrValues, WindowKeys, WindowSpec,
};
use tome_dist::{Group, Layout, ShardPlan};

use crate::launch;

const H: usize = 2;
const D: usize = 6;

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    valid: Vec<bool>,
    global: Option<(Tensor, Tensor, Tensor)>,
}

/// The rank counts of `counts` that this backend can run here; says which it leaves out.
fn rank_counts(counts: RangeInclusive<usize>) -> Vec<usize> {
    let max = crate::max_ranks();
    let (run, left): (Vec<usize>, Vec<usize>) = counts.partition(|&p| p <= max);
    if !left.is_empty() {
        eprintln!("skipping the cases on {left:?} ranks: this backend runs at most {max} here");
    }
    run
}

/// Whether this backend can run `p` ranks here; says so when it cannot.
fn fits(p: usize) -> bool {
    if !crate::available() {
        return false;
    }
    let max = crate::max_ranks();
    if p > max {
        eprintln!("skipping: the test needs {p} ranks; this backend runs at most {max} here");
    }
    p <= max
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
    KeyBlock { k: plan.shard_of(&x.k, 1, r).unwrap(), v: plan.shard_of(&x.v, 1, r).unwrap(), valid: pos.iter().map(|&i| x.valid[i as usize]).collect(), pos }
}

/// Runs `op(group, rank)` on every rank of `plan`; returns the output reassembled along `dim`
/// and the bytes all ranks sent.
fn on_ranks(plan: &ShardPlan, dim: usize, op: impl Fn(&dyn Group, usize) -> tome_dist::Result<Tensor> + Sync) -> (Tensor, u64) {
    let outs = launch(plan.ranks(), |g: &dyn Group| -> tome_dist::Result<_> { Ok((op(g, g.rank())?, g.bytes_sent())) }).unwrap();
    let bytes = outs.iter().map(|o| o.1).sum();
    let shards: Vec<Tensor> = outs.into_iter().map(|o| o.0).collect();
    (plan.unshard(&shards, dim).unwrap(), bytes)
}

fn dense(x: &Inputs, plan: &ShardPlan, causal: bool) -> (Tensor, u64) {
    on_ranks(plan, 1, |g, r| ring_attention(g, &plan.shard_of(&x.q, 1, r)?, &plan.positions(r), own(x, plan, r), DenseSpec { causal, scale: 0.4, precision: Precision::F32 }))
}

fn window(x: &Inputs, plan: &ShardPlan, spec: WindowSpec, globals: &[usize]) -> (Tensor, u64) {
    on_ranks(plan, 1, |g, r| {
        let projections = match &x.global {
            Some((gq, gk, gv)) => Some((plan.shard_of(gq, 1, r)?, plan.shard_of(gk, 1, r)?, plan.shard_of(gv, 1, r)?)),
            None => None,
        };
        let gt = GlobalTokens { positions: globals.to_vec(), projections };
        window_attention(g, plan, &plan.shard_of(&x.q, 1, r)?, own(x, plan, r), spec, Some(&gt))
    })
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
    if !crate::available() {
        return;
    }
    for &n in &[1, 4, 37, 130] {
        for &causal in &[false, true] {
            let x = inputs(n, n as u64, true, false);
            let (one, _) = dense(&x, &ShardPlan::new(Layout::Contiguous, n, 1).unwrap(), causal);
            // One rank against the naive reference.
            let pos: Vec<i64> = (0..n as i64).collect();
            let want = reference::attention(&x.q, &x.k, &x.v, &Mask::full(&pos, &pos).with_causal(causal).with_key_valid(Some(&x.valid)), 0.4).unwrap();
            assert!(max_diff(&one, &want.out) <= 2e-5, "1 rank vs reference, n={n} causal={causal}");
            for p in rank_counts(1..=5) {
                for plan in plans(n, p) {
                    let (many, _) = dense(&x, &plan, causal);
                    let d = max_diff(&many, &one);
                    assert!(d <= 1e-5, "dense n={n} p={p} causal={causal} plan={plan:?}: diff {d}");
                }
            }
        }
    }
}

#[test]
fn relative_bias_p_ranks_equal_one_rank_and_the_naive_reference() {
    use tome_attn::relative_bias::{dense_bias, RelativeBias};
    use tome_dist::ops::ring_attention_with_bias;
    if !crate::available() {
        return;
    }
    // 8 buckets, exact up to 1, log-spaced to 6: distances up to 130 share the far buckets.
    let bias = RelativeBias { table: (0..8).map(|b| (0..H).map(|h| 0.25 * b as f32 - 0.5 * h as f32).collect()).collect(), num_buckets: 8, max_distance: 6, bidirectional: true };
    for &n in &[1, 4, 37, 130] {
        let x = inputs(n, 50 + n as u64, true, false);
        let run = |plan: &ShardPlan| on_ranks(plan, 1, |g, r| ring_attention_with_bias(g, &plan.shard_of(&x.q, 1, r)?, &plan.positions(r), own(&x, plan, r), &bias)).0;
        let one = run(&ShardPlan::new(Layout::Contiguous, n, 1).unwrap());
        // The naive reference: softmax(q·k + bias) over valid keys.
        let pos: Vec<i64> = (0..n as i64).collect();
        let key_mask: Vec<f32> = x.valid.iter().map(|&v| if v { 0.0 } else { f32::NEG_INFINITY }).collect();
        let key_mask = Tensor::from_vec(key_mask, (1, 1, n), &Device::Cpu).unwrap();
        let scores = (x.q.matmul(&x.k.t().unwrap()).unwrap() + dense_bias(&pos, &pos, &bias, H).unwrap()).unwrap().broadcast_add(&key_mask).unwrap();
        let e = scores.broadcast_sub(&scores.max_keepdim(2).unwrap()).unwrap().exp().unwrap();
        let want = e.broadcast_div(&e.sum_keepdim(2).unwrap()).unwrap().matmul(&x.v).unwrap();
        assert!(max_diff(&one, &want) <= 2e-5, "1 rank vs reference, n={n}");
        for p in rank_counts(1..=5) {
            for plan in plans(n, p) {
                let d = max_diff(&run(&plan), &one);
                assert!(d <= 1e-5, "relative bias n={n} p={p} plan={plan:?}: diff {d}");
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
            let sees = |j: usize| x.valid[j] && if is_global(i) { true } else { is_global(j) || ((!causal || j <= i) && (i as i64 - j as i64).unsigned_abs() as usize <= w) };
            let scores: Vec<f64> = (0..n).map(|j| if sees(j) { 0.4 * (0..D).map(|t| qs[h][i][t] as f64 * ks[h][j][t] as f64).sum::<f64>() } else { f64::NEG_INFINITY }).collect();
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
    if !crate::available() {
        return;
    }
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
                        let spec = WindowSpec { one_sided: w, causal, scale: 0.4, precision: Precision::F32 };
                        let (one, _) = window(&x, &ShardPlan::new(Layout::Contiguous, n, 1).unwrap(), spec, &globals);
                        let want = naive_window(&x, w, causal, &globals);
                        let d = max_diff(&one, &want);
                        assert!(d <= 2e-5, "window 1 rank vs naive: n={n} w={w} causal={causal} globals={globals:?}: {d}");
                        for p in rank_counts(2..=5) {
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
fn window_queries_in_row_blocks_equal_the_whole_shard() {
    if !crate::available() {
        return;
    }
    // A layer may fetch the halo once and attend its queries a row block at a time.
    for &n in &[23, 90] {
        for &w in &[0, 4, 30] {
            for &causal in &[false, true] {
                let x = inputs(n, (n * 7 + w) as u64, true, false);
                let spec = WindowSpec { one_sided: w, causal, scale: 0.4, precision: Precision::F32 };
                for p in rank_counts(1..=4) {
                    for plan in plans(n, p) {
                        let (whole, _) = window(&x, &plan, spec, &[]);
                        let (blocked, _) = on_ranks(&plan, 1, |g, r| {
                            let keys = window_keys(g, &plan, &own(&x, &plan, r), spec)?;
                            let (q, pos) = (plan.shard_of(&x.q, 1, r)?, plan.positions(r));
                            let mut rows = Vec::new();
                            for start in (0..pos.len()).step_by(7) {
                                let len = 7.min(pos.len() - start);
                                rows.push(keys.attend(&q.narrow(1, start, len)?, &pos[start..start + len])?);
                            }
                            if rows.is_empty() {
                                return keys.attend(&q, &pos);
                            }
                            Ok(Tensor::cat(&rows, 1)?)
                        });
                        let d = max_diff(&blocked, &whole);
                        assert!(d <= 1e-5, "window in blocks n={n} w={w} p={p} causal={causal} plan={plan:?}: {d}");
                    }
                }
            }
        }
    }
}

/// The queries `q` (at `pos`) attending a block of rows at a time, each block the keys
/// `keys_for(rows)` gives: blocks of `block` rows, or with `block` 0 of 1, 2, 3... rows.
fn attend_in_blocks(q: &Tensor, pos: &[i64], block: usize, mut keys_for: impl FnMut(Range<usize>) -> tome_dist::Result<WindowKeys>) -> tome_dist::Result<Tensor> {
    let mut blocks = Vec::new();
    let mut start = 0;
    while start < pos.len() {
        let rows = start..(start + if block == 0 { blocks.len() + 1 } else { block }).min(pos.len());
        blocks.push(keys_for(rows.clone())?.attend(&q.narrow(1, start, rows.len())?, &pos[rows.clone()])?);
        start = rows.end;
    }
    if blocks.is_empty() {
        return Ok(Tensor::zeros((H, 0, D), candle_core::DType::F32, &Device::Cpu)?);
    }
    Ok(Tensor::cat(&blocks, 1)?)
}

#[test]
fn streamed_keys_give_the_joined_keys_results_to_the_bit() {
    if !crate::available() {
        return;
    }
    // Ranks whose shard is one run stream their keys and values a chunk of query rows at a time;
    // the others (zigzag shards, empty shards) join keys as before, in the same exchange. Every
    // own row is projected exactly once, and the buffers hold no more than a chunk's or a block's
    // query rows and their window.
    for &n in &[23, 90] {
        for &w in &[0, 4, 30] {
            for &causal in &[false, true] {
                let x = inputs(n, (n * 5 + w) as u64, true, false);
                let spec = WindowSpec { one_sided: w, causal, scale: 0.4, precision: Precision::F32 };
                for p in rank_counts(1..=4) {
                    for plan in plans(n, p) {
                        // Block 0: blocks that grow, outgrowing the buffers made for the first.
                        for &(chunk, block) in &[(1, 1), (7, 5), (16, 40), (1000, 96), (2, 0)] {
                            // Query blocks tile the kernel's work as they are given, so both sides take the same.
                            let (joined, _) = on_ranks(&plan, 1, |g, r| {
                                let (own, q, pos) = (own(&x, &plan, r), plan.shard_of(&x.q, 1, r)?, plan.positions(r));
                                let keys = window_keys(g, &plan, &own, spec)?;
                                attend_in_blocks(&q, &pos, block, |_| Ok(keys.clone()))
                            });
                            let (streamed, _) = on_ranks(&plan, 1, |g, r| {
                                let (own, q, pos) = (own(&x, &plan, r), plan.shard_of(&x.q, 1, r)?, plan.positions(r));
                                if window_margins(&plan, r, spec).is_none() {
                                    let keys = window_keys(g, &plan, &own, spec)?;
                                    return attend_in_blocks(&q, &pos, block, |_| Ok(keys.clone()));
                                }
                                let projected = std::cell::RefCell::new(vec![0usize; pos.len()]);
                                let widest = chunk.max(if block == 0 { pos.len() } else { block }) + 2 * w;
                                // Rows per head of the buffers written once the stream is open.
                                let (open, buffer_rows) = (std::cell::Cell::new(false), std::cell::RefCell::new(Vec::new()));
                                let project = |which: KeysOrValues, rows: Range<usize>, into: HeadRows<'_>| -> tome_dist::Result<()> {
                                    assert!(into.rows <= widest, "buffers of {} rows for {chunk} query rows under w = {w}", into.rows);
                                    if open.get() {
                                        buffer_rows.borrow_mut().push(into.rows);
                                    }
                                    let t = match which {
                                        KeysOrValues::Keys => {
                                            rows.clone().for_each(|i| projected.borrow_mut()[i] += 1);
                                            &own.k
                                        }
                                        KeysOrValues::Values => &own.v,
                                    };
                                    let src = t.narrow(1, rows.start, rows.len())?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                                    for (h, head) in src.chunks(rows.len() * D).enumerate() {
                                        into.buffer[(h * into.rows + into.at) * D..][..head.len()].copy_from_slice(head);
                                    }
                                    Ok(())
                                };
                                let shape = KeyShape { kv_heads: H, key_dim: D, value_dim: D };
                                let mut stream = window_key_stream(g, &plan, &own.valid, spec, shape, chunk, project)?;
                                open.set(true);
                                let out = attend_in_blocks(&q, &pos, block, |rows| stream.keys_for(rows).cloned())?;
                                let projected = projected.borrow().clone();
                                assert!(projected.iter().all(|&c| c == 1), "rank {r}'s rows projected {projected:?} times");
                                // Blocks of one size never outgrow the buffers made for the first chunk.
                                let sizes = buffer_rows.borrow().clone();
                                assert!(block == 0 || sizes.windows(2).all(|s| s[0] == s[1]), "rank {r}'s buffers made at {sizes:?} rows");
                                // Going back to the first rows makes their keys again.
                                if !pos.is_empty() {
                                    let first = 0..block.clamp(1, pos.len());
                                    let again = stream.keys_for(first.clone())?.attend(&q.narrow(1, 0, first.len())?, &pos[first.clone()])?;
                                    assert_eq!(max_diff(&again, &out.narrow(1, 0, first.len())?), 0.0, "rank {r} going back");
                                }
                                Ok(out)
                            });
                            assert_eq!(max_diff(&streamed, &joined), 0.0, "n={n} w={w} p={p} causal={causal} chunk={chunk} block={block} plan={plan:?}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn plans_send_exactly_the_bytes_they_need() {
    if !fits(3) {
        return;
    }
    // Per token: keys and values of 2 heads x 6 dims in f32 (96 bytes), plus one validity byte;
    // the ring also carries each key's position (8 bytes).
    let row = (2 * H * D * 4 + 1) as u64;
    let x = inputs(10, 1, false, false);
    let spec = WindowSpec { one_sided: 3, causal: false, scale: 0.4, precision: Precision::F32 };
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
    // Global token 5 (owned by rank 1 of [0,5) [5,10), w = 0): its key, value, position and
    // validity go to rank 0 (96 + 8 + 1 bytes), then its query and position (48 + 8); then both
    // ranks all-gather the global query's partial, output and lse (48 + 8 bytes each way).
    let plan = ShardPlan::from_bounds(&[0, 5, 10]).unwrap();
    let got = window(&x, &plan, WindowSpec { one_sided: 0, ..spec }, &[5]).1;
    assert_eq!(got, (row + 8) + ((H * D * 4) as u64 + 8) + 2 * (H * D * 4 + H * 4) as u64);
}

#[test]
fn refusals_and_peer_failures_are_errors() {
    if !fits(3) {
        return;
    }
    let x = inputs(8, 3, false, false);
    let plan = ShardPlan::new(Layout::Contiguous, 8, 2).unwrap();
    let spec = WindowSpec { one_sided: 2, causal: true, scale: 1.0, precision: Precision::F32 };
    let err = launch(2, |g: &dyn Group| -> tome_dist::Result<_> {
        let r = g.rank();
        let gt = GlobalTokens { positions: vec![1], projections: None };
        window_attention(g, &plan, &plan.shard_of(&x.q, 1, r)?, own(&x, &plan, r), spec, Some(&gt))
    })
    .unwrap_err();
    assert!(err.to_string().contains("global tokens with causal"), "{err}");
    // A rank that fails makes its peers fail instead of hanging, and the cause is reported.
    let err = launch(3, |g: &dyn Group| -> tome_dist::Result<_> {
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
    if !fits(4) {
        return;
    }
    let got = launch(4, |g: &dyn Group| -> tome_dist::Result<_> {
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
    let single = launch(1, |g: &dyn Group| g.all_gather(vec![])).unwrap();
    assert_eq!(single[0].len(), 1);
}

mod blocksparse {
    use super::*;
    use tome_attn::blocksparse::{reference, BlockSparsePlan, RandomBlocks};
    use tome_dist::ops::blocksparse_attention;

    pub(super) fn run(x: &Inputs, plan: &ShardPlan, pattern: &BlockSparsePlan) -> (Tensor, u64) {
        on_ranks(plan, 1, |g, r| blocksparse_attention(g, plan, &plan.shard_of(&x.q, 1, r)?, own(x, plan, r), pattern, 0.4, Precision::F32))
    }

    #[test]
    fn p_ranks_equal_one_rank_and_the_naive_reference() {
        if !crate::available() {
            return;
        }
        let randoms = [RandomBlocks::None, RandomBlocks::AllZero(2), RandomBlocks::Seeded { r: 2, seed: 11 }];
        for &(n, block) in &[(1, 4), (9, 4), (61, 4), (100, 7), (130, 16)] {
            for random in &randoms {
                let Ok(pattern) = BlockSparsePlan::new(n, block, H, random) else {
                    // Too few blocks for distinct random blocks: refused, as it must be.
                    assert!(matches!(random, RandomBlocks::Seeded { .. }));
                    continue;
                };
                let x = inputs(n, (n * 31 + block) as u64, n > 50, false);
                let (one, _) = run(&x, &ShardPlan::new(Layout::Contiguous, n, 1).unwrap(), &pattern);
                let (q, k, v) = (x.q.to_vec3::<f32>().unwrap(), x.k.to_vec3::<f32>().unwrap(), x.v.to_vec3::<f32>().unwrap());
                let want = reference(&q, &k, &v, &x.valid, &pattern, 0.4);
                let want = Tensor::new(want, &Device::Cpu).unwrap();
                let d = max_diff(&one, &want);
                assert!(d <= 2e-5, "1 rank vs reference n={n} block={block} {random:?}: {d}");
                for p in rank_counts(2..=5) {
                    for plan in plans(n, p) {
                        let d = max_diff(&run(&x, &plan, &pattern).0, &one);
                        assert!(d <= 1e-5, "n={n} block={block} {random:?} p={p} {plan:?}: {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn fetches_only_the_listed_blocks() {
        if !fits(2) {
            return;
        }
        // 8 blocks of 2 tokens over 2 ranks ([0,8) and [8,16)), no random blocks.
        // Rank 0's middle query blocks 1..3 need blocks 0..4 and the last (7): it fetches
        // block 4 and block 7 (4 rows). Rank 1's blocks 4..6 need 0, 3..7: it fetches blocks 0
        // and 3 (4 rows). Then the global query blocks 0 and 7 (2 rows each) are all-gathered
        // with positions, and their partials (4 queries) go both ways.
        let x = inputs(16, 5, false, false);
        let pattern = BlockSparsePlan::new(16, 2, H, &RandomBlocks::None).unwrap();
        let plan = ShardPlan::from_bounds(&[0, 8, 16]).unwrap();
        let row = (2 * H * D * 4 + 1) as u64;
        let q_rows = 2 * ((H * D * 4) as u64 + 8);
        let partials = 2 * 4 * (H * D * 4 + H * 4) as u64;
        assert_eq!(run(&x, &plan, &pattern).1, 8 * row + 2 * q_rows + partials);
    }
}

mod favor {
    use super::*;
    use tome_attn::favor::{orthogonal_projection, reference};
    use tome_dist::ops::{favor_attention, FavorSpec};

    fn run(x: &Inputs, plan: &ShardPlan, spec: &FavorSpec) -> (Tensor, u64) {
        on_ranks(plan, 1, |g, r| favor_attention(g, plan, &plan.shard_of(&x.q, 1, r)?, &plan.shard_of(&x.k, 1, r)?, &plan.shard_of(&x.v, 1, r)?, spec))
    }

    #[test]
    fn p_ranks_equal_one_rank_and_the_reference() {
        if !crate::available() {
            return;
        }
        let proj = orthogonal_projection(10, D, 3).unwrap();
        // Rows of a block are orthogonal.
        let p = proj.to_vec2::<f32>().unwrap();
        let dot: f32 = p[0].iter().zip(&p[1]).map(|(a, b)| a * b).sum();
        assert!(dot.abs() < 1e-4, "{dot}");
        for &n in &[1, 7, 50, 131] {
            for causal in [false, true] {
                let x = inputs(n, n as u64 + 70, false, false);
                let spec = FavorSpec { projection: proj.clone(), causal, chunk: 16, rows: 24 };
                let (one, _) = run(&x, &ShardPlan::new(Layout::Contiguous, n, 1).unwrap(), &spec);
                let (q, k, v) = (x.q.to_vec3::<f32>().unwrap(), x.k.to_vec3::<f32>().unwrap(), x.v.to_vec3::<f32>().unwrap());
                let want = Tensor::new(reference(&q, &k, &v, &p, causal), &Device::Cpu).unwrap();
                let d = max_diff(&one, &want);
                assert!(d <= 1e-4, "1 rank vs reference n={n} causal={causal}: {d}");
                for ranks in rank_counts(2..=5) {
                    for plan in plans(n, ranks) {
                        if causal && !plan.is_contiguous() {
                            let err = launch(ranks, |g: &dyn Group| {
                                favor_attention(g, &plan, &plan.shard_of(&x.q, 1, g.rank())?, &plan.shard_of(&x.k, 1, g.rank())?, &plan.shard_of(&x.v, 1, g.rank())?, &spec)
                            });
                            assert!(err.unwrap_err().to_string().contains("contiguous"));
                            continue;
                        }
                        let d = max_diff(&run(&x, &plan, &spec).0, &one);
                        assert!(d <= 1e-5, "n={n} causal={causal} p={ranks} {plan:?}: {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn sends_the_state_not_the_keys() {
        if !fits(3) {
            return;
        }
        // m = 10 features, dv = 6, 2 heads, 3 ranks. Stabiliser: all-gather of 2 floats.
        // Bidirectional: all-reduce (all-gather) of the context (2x10x6) and key sum (2x10).
        // Causal: a chain of 2 sends of the (context, key sum) state.
        let x = inputs(40, 9, false, false);
        let plan = ShardPlan::new(Layout::Contiguous, 40, 3).unwrap();
        let proj = orthogonal_projection(10, D, 3).unwrap();
        let gather = |bytes: u64| 3 * 2 * bytes; // every rank sends to the two others
        let spec = FavorSpec { projection: proj.clone(), causal: false, chunk: 8, rows: 5 };
        assert_eq!(run(&x, &plan, &spec).1, gather(2 * 4) + gather(2 * 10 * 6 * 4) + gather(2 * 10 * 4));
        let spec = FavorSpec { causal: true, ..spec };
        assert_eq!(run(&x, &plan, &spec).1, gather(2 * 4) + 2 * (2 * (10 * 6 + 10) * 4));
    }
}

mod moe {
    use super::*;
    use tome_dist::ops::{apply_experts, route_tokens, Routing};

    /// Routing and capacity written out for the whole sequence at once.
    fn naive(logits: &[Vec<f32>], capacity: usize) -> Routing {
        let mut used = vec![0; logits[0].len()];
        let mut r = Routing { expert: vec![], prob: vec![], kept: vec![] };
        for row in logits {
            let e = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            let z: f64 = row.iter().map(|x| (*x as f64).exp()).sum();
            used[e] += 1;
            r.expert.push(e);
            r.prob.push(((row[e] as f64).exp() / z) as f32);
            r.kept.push(used[e] <= capacity);
        }
        r
    }

    #[test]
    fn capacity_is_decided_in_global_token_order_on_any_number_of_ranks() {
        if !fits(2) {
            return;
        }
        let mut rng = StdRng::seed_from_u64(5);
        let (n, experts, capacity) = (57, 4, 11);
        let logits: Vec<Vec<f32>> = (0..n).map(|_| (0..experts).map(|_| rng.random_range(-3.0f32..3.0)).collect()).collect();
        let want = naive(&logits, capacity);
        assert!(want.kept.iter().any(|k| !k), "the case drops tokens");
        let all = Tensor::new(logits.clone(), &Device::Cpu).unwrap();
        let x = Tensor::new((0..n).map(|i| vec![i as f32, 1.0]).collect::<Vec<_>>(), &Device::Cpu).unwrap();
        for (p, plan) in rank_counts(1..=5).into_iter().flat_map(|p| plans(n, p).into_iter().filter(|pl| pl.is_contiguous()).map(move |pl| (p, pl))) {
            let got = launch(p, |g: &dyn Group| -> tome_dist::Result<_> {
                let routing = route_tokens(g, &plan, &plan.shard_of(&all, 0, g.rank())?, capacity)?;
                // Expert e doubles its input and adds e.
                let y = apply_experts(&plan.shard_of(&x, 0, g.rank())?, &routing, experts, &|e, rows| Ok(((rows * 2.0)? + e as f64)?))?;
                Ok((routing, y, g.bytes_sent()))
            })
            .unwrap();
            let mut merged = Routing { expert: vec![], prob: vec![], kept: vec![] };
            let mut ys = Vec::new();
            let mut total = 0;
            for (r, y, bytes) in got {
                merged.expert.extend(r.expert);
                merged.prob.extend(r.prob);
                merged.kept.extend(r.kept);
                ys.push(y);
                total += bytes;
            }
            assert_eq!(total, ((p - 1) * experts * 4) as u64, "only the per-expert counts travel, rank to rank");
            assert_eq!(merged.expert, want.expert);
            assert_eq!(merged.kept, want.kept, "p={p}");
            for (a, b) in merged.prob.iter().zip(&want.prob) {
                assert!((a - b).abs() < 1e-6);
            }
            let y = Tensor::cat(&ys, 0).unwrap().to_vec2::<f32>().unwrap();
            for (i, row) in y.iter().enumerate() {
                let expect = if want.kept[i] { want.prob[i] * (2.0 * i as f32 + want.expert[i] as f32) } else { 0.0 };
                assert!((row[0] - expect).abs() < 1e-4, "token {i}");
            }
        }
        let zig = ShardPlan::new(Layout::Zigzag, n, 2).unwrap();
        let err = launch(2, |g: &dyn Group| route_tokens(g, &zig, &zig.shard_of(&all, 0, g.rank())?, capacity)).unwrap_err();
        assert!(err.to_string().contains("contiguous"));
    }
}

mod recurrent {
    use super::*;
    use tome_attn::relative::{segment_attention, sinusoid};
    use tome_dist::ops::{segment_recurrence, Compression, CompressiveMemory, XlMemory};

    const W: usize = 8; // model width
    const CLAMP: usize = 9;

    struct Layer {
        wq: Tensor,
        wk: Tensor,
        wv: Tensor,
        wr: Tensor,
        u: Tensor,
        vb: Tensor,
    }

    fn layer(seed: u64) -> Layer {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut m = |r: usize, c: usize| Tensor::from_vec((0..r * c).map(|_| rng.random_range(-0.5f32..0.5)).collect::<Vec<_>>(), (r, c), &Device::Cpu).unwrap();
        Layer { wq: m(W, H * D), wk: m(W, H * D), wv: m(W, H * D), wr: m(W, H * D), u: m(H, D), vb: m(H, D) }
    }

    fn heads(t: &Tensor) -> Tensor {
        let n = t.dim(0).unwrap();
        t.reshape((n, H, D)).unwrap().transpose(0, 1).unwrap().contiguous().unwrap()
    }

    /// The layer for one segment, given the memory rows that precede it.
    fn attend(l: &Layer, memory: &Tensor, seg: &Tensor) -> tome_dist::Result<Tensor> {
        let x = Tensor::cat(&[memory, seg], 0)?;
        let klen = x.dim(0)?;
        let r = heads(&sinusoid(klen, W)?.matmul(&l.wr)?);
        let p = segment_attention(&heads(&seg.matmul(&l.wq)?), &heads(&x.matmul(&l.wk)?), &heads(&x.matmul(&l.wv)?), &r, &l.u, &l.vb, CLAMP, None)?;
        let n = seg.dim(0)?;
        Ok(p.out.transpose(0, 1)?.reshape((n, H * D))?)
    }

    fn input(n: usize, seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        Tensor::from_vec((0..n * W).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>(), (n, W), &Device::Cpu).unwrap()
    }

    /// One Transformer-XL layer written out position by position: query i of segment s sees
    /// inputs max(0, start(s) - M) ..= i.
    fn naive_xl(l: &Layer, x: &Tensor, seg: usize, mem: usize) -> Vec<Vec<f32>> {
        let n = x.dim(0).unwrap();
        let (q, k, v) =
            (x.matmul(&l.wq).unwrap().to_vec2::<f32>().unwrap(), x.matmul(&l.wk).unwrap().to_vec2::<f32>().unwrap(), x.matmul(&l.wv).unwrap().to_vec2::<f32>().unwrap());
        let r = sinusoid(n + 1, W).unwrap().matmul(&l.wr).unwrap().to_vec2::<f32>().unwrap();
        let (u, vb) = (l.u.to_vec2::<f32>().unwrap(), l.vb.to_vec2::<f32>().unwrap());
        let mut out = vec![vec![0f32; H * D]; n];
        for i in 0..n {
            let first = (i - i % seg).saturating_sub(mem);
            for h in 0..H {
                let dot = |a: &[f32], b: &[f32], bias: &[f32]| (0..D).map(|t| (a[h * D + t] + bias[t]) as f64 * b[h * D + t] as f64).sum::<f64>();
                let s: Vec<f64> = (first..=i).map(|j| (dot(&q[i], &k[j], &u[h]) + dot(&q[i], &r[(i - j).min(CLAMP)], &vb[h])) / (D as f64).sqrt()).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for t in 0..D {
                    out[i][h * D + t] = ((first..=i).zip(&e).map(|(j, w)| w * v[j][h * D + t] as f64).sum::<f64>() / z) as f32;
                }
            }
        }
        out
    }

    fn run<M: tome_dist::ops::Memory + Sync>(
        x: &Tensor,
        plan: &ShardPlan,
        seg: usize,
        first: &M,
        step: &(dyn Fn(&M, &Tensor) -> tome_dist::Result<Tensor> + Sync),
    ) -> (Tensor, u64) {
        on_ranks(plan, 0, |g, r| segment_recurrence(g, plan, &plan.shard_of(x, 0, r)?, seg, first, step))
    }

    #[test]
    fn transformer_xl_p_ranks_equal_one_rank_and_the_naive_reference() {
        if !crate::available() {
            return;
        }
        let l = layer(1);
        for &(n, seg, mem) in &[(1, 4, 4), (23, 4, 6), (40, 5, 12), (37, 8, 3)] {
            let x = input(n, n as u64);
            let first = XlMemory::empty(mem, W).unwrap();
            let step = |m: &XlMemory, s: &Tensor| attend(&l, &m.mem, s);
            let (one, _) = run(&x, &ShardPlan::aligned(n, 1, seg).unwrap(), seg, &first, &step);
            let want = Tensor::new(naive_xl(&l, &x, seg, mem), &Device::Cpu).unwrap();
            assert!(max_diff(&one, &want) <= 1e-4, "1 rank vs naive n={n} seg={seg} mem={mem}: {}", max_diff(&one, &want));
            for p in rank_counts(2..=5) {
                let (many, bytes) = run(&x, &ShardPlan::aligned(n, p, seg).unwrap(), seg, &first, &step);
                assert!(max_diff(&many, &one) <= 1e-5, "n={n} seg={seg} mem={mem} p={p}");
                // Each rank but the last passes at most mem_len rows of memory on.
                assert!(bytes <= ((p - 1) * mem * W * 4) as u64);
                // Lopsided: the first rank holds one segment, an empty rank in the middle.
                let mut bounds = vec![0, seg.min(n), seg.min(n)];
                bounds.extend((3..p).map(|r| (r * seg).min(n)));
                bounds.push(n);
                let (many, _) = run(&x, &ShardPlan::from_bounds(&bounds).unwrap(), seg, &first, &step);
                assert!(max_diff(&many, &one) <= 1e-5, "n={n} seg={seg} mem={mem} bounds={bounds:?}");
            }
        }
        // Memory longer than a shard comes from more than one rank, through the chain:
        // 5 ranks of one 2-token segment each, memory 7.
        if !fits(5) {
            return;
        }
        let x = input(10, 3);
        let first = XlMemory::empty(7, W).unwrap();
        let step = |m: &XlMemory, s: &Tensor| attend(&l, &m.mem, s);
        let (many, bytes) = run(&x, &ShardPlan::aligned(10, 5, 2).unwrap(), 2, &first, &step);
        let want = Tensor::new(naive_xl(&l, &x, 2, 7), &Device::Cpu).unwrap();
        assert!(max_diff(&many, &want) <= 1e-4);
        assert_eq!(bytes, ((2 + 4 + 6 + 7) * W * 4) as u64, "the memory grows 2, 4, 6, then is capped at 7");
    }

    #[test]
    fn compressive_p_ranks_equal_one_rank_and_the_naive_reference() {
        if !crate::available() {
            return;
        }
        let l = layer(2);
        let mut rng = StdRng::seed_from_u64(4);
        let conv_w = Tensor::from_vec((0..W * W * 2).map(|_| rng.random_range(-0.5f32..0.5)).collect::<Vec<_>>(), (W, W, 2), &Device::Cpu).unwrap();
        let conv_b = Tensor::from_vec((0..W).map(|_| rng.random_range(-0.5f32..0.5)).collect::<Vec<_>>(), W, &Device::Cpu).unwrap();
        for compression in [Compression::Mean, Compression::Max, Compression::Conv { weight: conv_w.clone(), bias: conv_b.clone() }] {
            let (n, seg, mem, cmem, rate) = (44, 4, 8, 3, 2);
            let x = input(n, 9);
            let first = CompressiveMemory::empty(mem, cmem, rate, compression.clone(), W).unwrap();
            let step = |m: &CompressiveMemory, s: &Tensor| attend(&l, &Tensor::cat(&[&m.cmem, &m.mem], 0)?, s);
            let (one, _) = run(&x, &ShardPlan::aligned(n, 1, seg).unwrap(), seg, &first, &step);
            // Naive: fold the memory plainly, attend over [cmem; mem; segment].
            let rows = x.to_vec2::<f32>().unwrap();
            let (mut m, mut c): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (vec![], vec![]);
            let mut want = Vec::new();
            for s in rows.chunks(seg) {
                let memory: Vec<Vec<f32>> = c.iter().chain(&m).cloned().collect();
                let mt = Tensor::new(memory, &Device::Cpu).unwrap_or(Tensor::zeros((0, W), candle_core::DType::F32, &Device::Cpu).unwrap());
                let mt = if mt.dims().len() == 2 { mt } else { Tensor::zeros((0, W), candle_core::DType::F32, &Device::Cpu).unwrap() };
                want.push(attend(&l, &mt, &Tensor::new(s.to_vec(), &Device::Cpu).unwrap()).unwrap());
                m.extend(s.iter().cloned());
                let evicted: Vec<Vec<f32>> = m.drain(..m.len().saturating_sub(mem)).collect();
                for g in evicted.chunks(rate) {
                    c.push(match &compression {
                        Compression::Mean => (0..W).map(|f| g.iter().map(|r| r[f]).sum::<f32>() / rate as f32).collect(),
                        Compression::Max => (0..W).map(|f| g.iter().map(|r| r[f]).fold(f32::NEG_INFINITY, f32::max)).collect(),
                        Compression::Conv { weight, bias } => {
                            let (w, b) = (weight.to_vec3::<f32>().unwrap(), bias.to_vec1::<f32>().unwrap());
                            (0..W).map(|o| b[o] + (0..W).map(|ci| (0..rate).map(|t| w[o][ci][t] * g[t][ci]).sum::<f32>()).sum::<f32>()).collect()
                        }
                    });
                }
                let keep = c.len().saturating_sub(cmem);
                c.drain(..keep);
            }
            let want = Tensor::cat(&want, 0).unwrap();
            assert!(max_diff(&one, &want) <= 1e-4, "{compression:?}: {}", max_diff(&one, &want));
            for p in rank_counts(2..=5) {
                let (many, bytes) = run(&x, &ShardPlan::aligned(n, p, seg).unwrap(), seg, &first, &step);
                assert!(max_diff(&many, &one) <= 1e-5, "{compression:?} p={p}");
                if p == 2 {
                    // Shards [0,24) [24,44): rank 0 passes its full memory (8 rows) and the last
                    // 3 of the 8 compressed rows its 16 evicted inputs became.
                    assert_eq!(bytes, ((8 + 3) * W * 4) as u64);
                }
            }
        }
    }

    /// The wavefront: a rank starts layer l as soon as the previous rank has started it (and
    /// passed on its memory), not after the previous rank has finished every layer.
    #[test]
    fn ranks_work_on_the_layers_at_once() {
        if !fits(2) {
            return;
        }
        use std::sync::Mutex;
        use std::time::{Duration, Instant};
        let (n, seg, layers) = (16, 4, 4);
        let x = input(n, 8);
        let plan = ShardPlan::aligned(n, 2, seg).unwrap();
        let first = XlMemory::empty(4, W).unwrap();
        let starts = Mutex::new(Vec::new());
        let t0 = Instant::now();
        launch(2, |g: &dyn Group| -> tome_dist::Result<()> {
            let mut h = plan.shard_of(&x, 0, g.rank())?;
            for layer in 0..layers {
                let step = |m: &XlMemory, s: &Tensor| -> tome_dist::Result<Tensor> {
                    if g.rank() == 0 {
                        std::thread::sleep(Duration::from_millis(30)); // a slow first rank
                    }
                    Ok((Tensor::cat(&[&m.mem, s], 0)?.narrow(0, m.mem.dim(0)?, s.dim(0)?)? * 0.5)?)
                };
                starts.lock().unwrap().push((g.rank(), layer, t0.elapsed()));
                h = segment_recurrence(g, &plan, &h, seg, &first, &step)?;
            }
            Ok(())
        })
        .unwrap();
        let starts = starts.into_inner().unwrap();
        let at = |r: usize, l: usize| starts.iter().find(|s| s.0 == r && s.1 == l).unwrap().2;
        // Rank 0 spends >= 60 ms per layer (two segments); rank 1 must not wait for all of them.
        assert!(at(1, 1) < at(0, 3), "rank 1 started layer 1 at {:?}, after rank 0 started its last layer at {:?}", at(1, 1), at(0, 3));
    }

    #[test]
    fn misaligned_or_reordered_shards_are_refused() {
        if !fits(2) {
            return;
        }
        let x = input(20, 1);
        let first = XlMemory::empty(4, W).unwrap();
        let step = |m: &XlMemory, s: &Tensor| Ok(Tensor::cat(&[&m.mem, s], 0)?.narrow(0, m.mem.dim(0)?, s.dim(0)?)?);
        for plan in [ShardPlan::from_bounds(&[0, 6, 20]).unwrap(), ShardPlan::new(Layout::Zigzag, 20, 2).unwrap()] {
            let err = launch(2, |g: &dyn Group| segment_recurrence(g, &plan, &plan.shard_of(&x, 0, g.rank())?, 4, &first, &step)).unwrap_err();
            assert!(err.to_string().contains("segment") || err.to_string().contains("zigzag"), "{err}");
        }
    }
}

mod local {
    use super::*;
    use tome_attn::blocksparse::{reference, BlockSparsePlan};

    #[test]
    fn chunked_local_attention_wraps_around_on_any_number_of_ranks() {
        if !crate::available() {
            return;
        }
        for &(n, chunk, before, after, causal) in &[(40, 8, 1, 0, false), (45, 8, 1, 1, false), (64, 4, 2, 0, true), (6, 8, 1, 1, false)] {
            let pattern = BlockSparsePlan::local(n, chunk, H, before, after, causal).unwrap();
            let x = inputs(n, n as u64 + 500, n > 40, false);
            let run = |plan: &ShardPlan| super::blocksparse::run(&x, plan, &pattern).0;
            let one = run(&ShardPlan::new(Layout::Contiguous, n, 1).unwrap());
            let (q, k, v) = (x.q.to_vec3::<f32>().unwrap(), x.k.to_vec3::<f32>().unwrap(), x.v.to_vec3::<f32>().unwrap());
            let want = Tensor::new(reference(&q, &k, &v, &x.valid, &pattern, 0.4), &Device::Cpu).unwrap();
            assert!(max_diff(&one, &want) <= 2e-5, "1 rank vs reference: n={n} chunk={chunk}");
            for p in rank_counts(2..=5) {
                for plan in plans(n, p) {
                    assert!(max_diff(&run(&plan), &one) <= 1e-5, "n={n} chunk={chunk} p={p} {plan:?}");
                }
            }
        }
    }

    #[test]
    fn the_look_back_halo_wraps_from_the_last_rank_to_the_first() {
        if !fits(2) {
            return;
        }
        // 4 chunks of 4 over [0,8) [8,16), one chunk of look-back: rank 0's chunk 0 needs chunk
        // 3 (rows 12..16, from rank 1), rank 1's chunk 2 needs chunk 1 (rows 4..8, from rank 0).
        let pattern = BlockSparsePlan::local(16, 4, H, 1, 0, false).unwrap();
        let x = inputs(16, 3, false, false);
        let plan = ShardPlan::from_bounds(&[0, 8, 16]).unwrap();
        assert_eq!(super::blocksparse::run(&x, &plan, &pattern).1, 8 * (2 * H * D * 4 + 1) as u64);
    }
}

mod lsh {
    use super::*;
    use tome_attn::lsh::{buckets, reference, LshSpec};
    use tome_dist::ops::lsh_attention;

    fn rotations(spec: &LshSpec, seed: u64) -> Tensor {
        tome_attn::lsh::seeded_rotations(H, D, spec, seed).unwrap()
    }

    fn run(x: &Inputs, plan: &ShardPlan, rot: &Tensor, spec: &LshSpec) -> (Tensor, u64) {
        on_ranks(plan, 1, |g, r| {
            let valid: Vec<bool> = plan.positions(r).iter().map(|&i| x.valid[i as usize]).collect();
            lsh_attention(g, plan, &plan.shard_of(&x.q, 1, r)?, &plan.shard_of(&x.v, 1, r)?, &valid, rot, spec)
        })
    }

    #[test]
    fn p_ranks_equal_one_rank_and_the_naive_reference() {
        if !crate::available() {
            return;
        }
        let specs = [
            LshSpec { n_hashes: 1, n_buckets: 4, chunk_len: 4, chunks_before: 1, chunks_after: 0 },
            LshSpec { n_hashes: 2, n_buckets: 6, chunk_len: 5, chunks_before: 1, chunks_after: 1 },
            LshSpec { n_hashes: 3, n_buckets: 2, chunk_len: 8, chunks_before: 2, chunks_after: 0 },
        ];
        for (i, spec) in specs.iter().enumerate() {
            for &n in &[spec.chunk_len, spec.chunk_len * 3, spec.chunk_len * 8] {
                let x = inputs(n, (i * 100 + n) as u64, n > 20, false);
                let rot = rotations(spec, i as u64);
                let (one, _) = run(&x, &ShardPlan::new(Layout::Contiguous, n, 1).unwrap(), &rot, spec);
                let b = buckets(&x.q, &rot, &x.valid, spec).unwrap();
                let want = reference(&x.q.to_vec3::<f32>().unwrap(), &x.v.to_vec3::<f32>().unwrap(), &x.valid, &b, spec);
                let want = Tensor::new(want, &Device::Cpu).unwrap();
                assert!(max_diff(&one, &want) <= 2e-5, "1 rank vs reference {spec:?} n={n}: {}", max_diff(&one, &want));
                for p in rank_counts(2..=5) {
                    for plan in plans(n, p).into_iter().filter(|pl| pl.is_contiguous()) {
                        let (many, _) = run(&x, &plan, &rot, spec);
                        assert!(max_diff(&many, &one) <= 1e-5, "{spec:?} n={n} p={p} {plan:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn sends_items_to_their_chunks_and_back_and_nothing_more() {
        if !fits(3) {
            return;
        }
        let spec = LshSpec { n_hashes: 2, n_buckets: 4, chunk_len: 4, chunks_before: 1, chunks_after: 0 };
        let (n, p) = (24, 3);
        let x = inputs(n, 77, false, false);
        let rot = rotations(&spec, 5);
        let plan = ShardPlan::new(Layout::Contiguous, n, p).unwrap();
        // Independently: sort every head's items, deal chunks evenly, count what moves.
        let b = buckets(&x.q, &rot, &x.valid, &spec).unwrap();
        let total_chunks = spec.n_hashes * n / spec.chunk_len; // 12: 4 per rank
        let chunk_owner = |slot: usize| slot / spec.chunk_len / (total_chunks / p);
        let token_owner = |t: usize| t / (n / p);
        let mut moved = 0u64;
        for buckets in b.iter().take(H) {
            let mut items: Vec<(usize, usize)> = (0..spec.n_hashes).flat_map(|r| (0..n).map(move |t| (r, t))).collect();
            items.sort_by_key(|&(r, t)| (r * spec.n_buckets + buckets[r][t], t));
            moved += items.iter().enumerate().filter(|(s, (_, t))| chunk_owner(*s) != token_owner(*t)).count() as u64;
        }
        let item = (8 + 8 + 1 + D * 4 + D * 4) as u64; // slot, position, validity, qk, v
        let back = (D * 4 + 4) as u64; // output, lse
        let halo = p as u64 * H as u64 * spec.chunk_len as u64 * (8 + 1 + 2 * D as u64 * 4); // one chunk each, per head
        let gathers = (p * (p - 1)) as u64 * (4 + (H * spec.n_hashes * spec.n_buckets * 4) as u64);
        assert_eq!(run(&x, &plan, &rot, &spec).1, gathers + moved * (item + back) + halo);
        let zig = ShardPlan::new(Layout::Zigzag, n, 2).unwrap();
        let err = launch(2, |g: &dyn Group| lsh_attention(g, &zig, &zig.shard_of(&x.q, 1, g.rank())?, &zig.shard_of(&x.v, 1, g.rank())?, &[true; 12], &rot, &spec));
        assert!(err.unwrap_err().to_string().contains("contiguous"));
    }
}
