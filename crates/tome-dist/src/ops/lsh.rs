//! `lsh`: Reformer LSH attention across ranks (Kitaev et al. 2020).
//!
//! The chunks of LSH attention live in *sorted* order — by (round, bucket, position) — which no
//! shard layout of the sequence matches. The plan:
//! 1. every rank hashes its tokens; per-head bucket histograms are all-gathered, so each rank
//!    knows every item's global sorted slot (counts of smaller buckets, plus the same bucket on
//!    earlier ranks, plus its order within the rank);
//! 2. sorted slots are cut into chunks and dealt to ranks in whole chunks; items travel there by
//!    one all-to-all (query-key and value rows, token position, validity);
//! 3. the chunks a rank's chunks look back to (and ahead to) come from their owners, wrapping
//!    around from the last rank to the first;
//! 4. each rank attends its chunks and sends every item's (output, lse) back to the rank that
//!    owns the token, by the reverse all-to-all; rounds are merged there by log-sum-exp.
//!
//! Shards must be contiguous runs in rank order (positions break ties in the sort).

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{Device, Tensor};
use tome_attn::lsh::{self, LshSpec};

use crate::error::{DistError, Result};
use crate::group::{flags_to_tensor, tensor_to_flags, Frame, Group};
use crate::layout::ShardPlan;

/// Rows of one head held in sorted-slot space.
#[derive(Default, Clone)]
struct Rows {
    tok: Vec<i64>,
    valid: Vec<bool>,
    qk: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Rows {
    fn push(&mut self, tok: i64, valid: bool, qk: Vec<f32>, v: Vec<f32>) {
        self.tok.push(tok);
        self.valid.push(valid);
        self.qk.push(qk);
        self.v.push(v);
    }

    fn to_frame(&self, d: usize, dv: usize) -> Result<Frame> {
        let m = self.tok.len();
        Ok(vec![
            Tensor::from_vec(self.tok.clone(), m, &Device::Cpu)?,
            flags_to_tensor(&self.valid)?,
            Tensor::from_vec(self.qk.concat(), (m, d), &Device::Cpu)?,
            Tensor::from_vec(self.v.concat(), (m, dv), &Device::Cpu)?,
        ])
    }

    fn from_frame(f: &[Tensor]) -> Result<Self> {
        let [tok, valid, qk, v] = f else { return Err(DistError::Plan("an LSH row frame has 4 tensors per head".into())) };
        let (qk, v) = if tok.dim(0)? == 0 { (Vec::new(), Vec::new()) } else { (qk.to_vec2::<f32>()?, v.to_vec2::<f32>()?) };
        Ok(Rows { tok: tok.to_vec1::<i64>()?, valid: tensor_to_flags(valid)?, qk, v })
    }
}

/// A fetched halo row: token position, validity, query-key vector, value.
type HaloRow = (i64, bool, Vec<f32>, Vec<f32>);
/// Per token, each round's (lse, output).
type RoundPartials = Vec<(f32, Vec<f32>)>;

/// `n` items in `parts` runs differing by at most one (longer first).
fn even_bounds(n: usize, parts: usize) -> Vec<usize> {
    let (base, extra) = (n / parts, n % parts);
    let mut b = vec![0];
    for i in 0..parts {
        b.push(b[i] + base + usize::from(i < extra));
    }
    b
}

/// This rank's output rows of LSH attention. `qk` (shared query-key vectors) and `v` are
/// `[heads, shard, d]`; `rotations` `[heads, d, n_hashes, n_buckets / 2]`, the same on every rank.
pub fn lsh_attention(group: &dyn Group, plan: &ShardPlan, qk: &Tensor, v: &Tensor, valid: &[bool], rotations: &Tensor, spec: &LshSpec) -> Result<Tensor> {
    let (me, p) = (group.rank(), group.size());
    if !plan.is_contiguous() || plan.ranks() != p {
        return Err(DistError::Unsupported("LSH attention needs contiguous shards in rank order (positions break ties in the sort)".into()));
    }
    spec.check(plan.len())?;
    let (heads, n, d) = qk.dims3()?;
    let dv = v.dim(2)?;
    let start = plan.ranges(me).first().map_or(0, |r| r.start) as i64;

    // 1. Hash; learn every item's sorted slot from the histograms.
    let local_pad = valid.iter().filter(|v| !**v).count() as f32;
    let padded = group.all_reduce_sum(&Tensor::new(&[local_pad], &Device::Cpu)?)?.to_vec1::<f32>()?[0] > 0.0;
    let nb = spec.buckets_with_padding(padded);
    let keys_per_head = spec.n_hashes * nb;
    let b = lsh::buckets(qk, rotations, valid, spec)?;
    let mut counts = vec![0f32; heads * keys_per_head];
    for (h, per_head) in b.iter().enumerate() {
        for (r, per_round) in per_head.iter().enumerate() {
            for &bucket in per_round {
                counts[h * keys_per_head + r * nb + bucket] += 1.0;
            }
        }
    }
    let all_counts: Vec<Vec<f32>> = group
        .all_gather(vec![Tensor::from_vec(counts, heads * keys_per_head, &Device::Cpu)?])?
        .into_iter()
        .map(|f| f.first().map(|t| t.to_vec1::<f32>()).transpose())
        .collect::<candle_core::Result<Option<Vec<_>>>>()?
        .ok_or_else(|| DistError::Plan("an empty histogram frame".into()))?;
    let total_slots = spec.n_hashes * plan.len();
    let total_chunks = total_slots / spec.chunk_len;
    let bounds: Vec<usize> = even_bounds(total_chunks, p).into_iter().map(|c| c * spec.chunk_len).collect();
    let owner = |slot: usize| bounds.partition_point(|&b| b <= slot) - 1;
    let (lo, hi) = (bounds[me], bounds[me + 1]);

    // 2. Deal items to the owners of their slots.
    let qk_rows = qk.to_vec3::<f32>()?;
    let v_rows = v.to_vec3::<f32>()?;
    let mut outgoing: Vec<Vec<(Vec<i64>, Rows)>> = vec![vec![(Vec::new(), Rows::default()); heads]; p];
    let mut sent: Vec<Vec<Vec<(usize, usize)>>> = vec![vec![Vec::new(); heads]; p]; // (round, token) in send order
    for h in 0..heads {
        let mut next = vec![0usize; keys_per_head];
        for key in 0..keys_per_head {
            let smaller: f32 = all_counts.iter().map(|c| c[h * keys_per_head..h * keys_per_head + key].iter().sum::<f32>()).sum();
            let earlier: f32 = all_counts[..me].iter().map(|c| c[h * keys_per_head + key]).sum();
            next[key] = (smaller + earlier) as usize;
        }
        for (r, buckets) in b[h].iter().enumerate().take(spec.n_hashes) {
            for (t, &bucket) in buckets.iter().enumerate().take(n) {
                let key = r * nb + bucket;
                let slot = next[key];
                next[key] += 1;
                let q = owner(slot);
                outgoing[q][h].0.push(slot as i64);
                outgoing[q][h].1.push(start + t as i64, valid[t], qk_rows[h][t].clone(), v_rows[h][t].clone());
                sent[q][h].push((r, t));
            }
        }
    }
    let parts = outgoing
        .iter()
        .map(|per_head| {
            let mut f = Vec::new();
            for (slots, rows) in per_head {
                f.push(Tensor::from_vec(slots.clone(), slots.len(), &Device::Cpu)?);
                f.extend(rows.to_frame(d, dv)?);
            }
            Ok(f)
        })
        .collect::<Result<Vec<Frame>>>()?;
    let received = group.all_to_all(parts)?;
    let mut mine = vec![Rows { tok: vec![0; hi - lo], valid: vec![false; hi - lo], qk: vec![Vec::new(); hi - lo], v: vec![Vec::new(); hi - lo] }; heads];
    let mut arrivals: Vec<Vec<Vec<usize>>> = vec![vec![Vec::new(); heads]; p]; // slots in arrival order
    for (src, frame) in received.iter().enumerate() {
        for h in 0..heads {
            let f = &frame[h * 5..h * 5 + 5];
            let slots = f[0].to_vec1::<i64>()?;
            let rows = Rows::from_frame(&f[1..])?;
            for (i, &s) in slots.iter().enumerate() {
                let at = s as usize - lo;
                mine[h].tok[at] = rows.tok[i];
                mine[h].valid[at] = rows.valid[i];
                mine[h].qk[at] = rows.qk[i].clone();
                mine[h].v[at] = rows.v[i].clone();
                arrivals[src][h].push(s as usize);
            }
        }
    }

    // 3. The look-back and look-ahead chunks, wrapping around.
    let window = |c: usize| -> Vec<usize> {
        (0..=spec.chunks_before + spec.chunks_after).map(|o| (c + total_chunks * (spec.chunks_before + 1) + o - spec.chunks_before) % total_chunks).collect()
    };
    let needs = |q: usize| -> Vec<Range<usize>> {
        let (a, z) = (bounds[q] / spec.chunk_len, bounds[q + 1] / spec.chunk_len);
        let mut chunks: Vec<usize> = (a..z).flat_map(window).filter(|&c| c < a || c >= z).collect();
        chunks.sort_unstable();
        chunks.dedup();
        chunks.into_iter().map(|c| c * spec.chunk_len..(c + 1) * spec.chunk_len).collect()
    };
    for q in (0..p).filter(|&q| q != me) {
        let wanted: Vec<usize> = needs(q).into_iter().flatten().filter(|s| (lo..hi).contains(s)).collect();
        if wanted.is_empty() {
            continue;
        }
        let mut frame = Vec::new();
        for rows in &mine {
            let mut sel = Rows::default();
            for &s in &wanted {
                sel.push(rows.tok[s - lo], rows.valid[s - lo], rows.qk[s - lo].clone(), rows.v[s - lo].clone());
            }
            frame.extend(sel.to_frame(d, dv)?);
        }
        group.send(q, frame)?;
    }
    let mut halo: Vec<HashMap<usize, HaloRow>> = vec![HashMap::new(); heads];
    let my_needs: Vec<usize> = needs(me).into_iter().flatten().collect();
    for q in (0..p).filter(|&q| q != me) {
        let from: Vec<usize> = my_needs.iter().copied().filter(|&s| owner(s) == q).collect();
        if from.is_empty() {
            continue;
        }
        let frame = group.recv(q)?;
        for (h, map) in halo.iter_mut().enumerate() {
            let rows = Rows::from_frame(&frame[h * 4..h * 4 + 4])?;
            for (i, &s) in from.iter().enumerate() {
                map.insert(s, (rows.tok[i], rows.valid[i], rows.qk[i].clone(), rows.v[i].clone()));
            }
        }
    }

    // 4. Attend my chunks (batched matrix products over every chunk of a head); send each
    //    item's (output, lse) home.
    let (c0, c1) = (lo / spec.chunk_len, hi / spec.chunk_len);
    let key_slots: Vec<usize> = (c0..c1).flat_map(window).flat_map(|kc| kc * spec.chunk_len..(kc + 1) * spec.chunk_len).collect();
    let mut results: Vec<Vec<(Vec<f32>, f32)>> = vec![vec![(Vec::new(), 0.0); hi - lo]; heads];
    for h in (0..heads).filter(|_| c1 > c0) {
        // One table of rows: this rank's slots, then the halo's; keys gathered from it by index.
        let halo_slots: Vec<usize> = {
            let mut s: Vec<usize> = halo[h].keys().copied().collect();
            s.sort_unstable();
            s
        };
        let row_of = |s: usize| -> Result<u32> {
            if (lo..hi).contains(&s) {
                Ok((s - lo) as u32)
            } else {
                halo_slots.binary_search(&s).map(|i| (hi - lo + i) as u32).map_err(|_| DistError::Plan(format!("slot {s} never arrived")))
            }
        };
        let mut tok: Vec<i64> = mine[h].tok.clone();
        let mut ok: Vec<bool> = mine[h].valid.clone();
        let mut keys: Vec<f32> = mine[h].qk.iter().flat_map(|x| lsh::normalize_key(x)).collect();
        let mut vals: Vec<f32> = mine[h].v.concat();
        for s in &halo_slots {
            let row = &halo[h][s];
            tok.push(row.0);
            ok.push(row.1);
            keys.extend(lsh::normalize_key(&row.2));
            vals.extend_from_slice(&row.3);
        }
        let rows = tok.len();
        let idx: Vec<u32> = key_slots.iter().map(|&s| row_of(s)).collect::<Result<_>>()?;
        let window_len = idx.len() / (c1 - c0);
        let ids = Tensor::from_vec(idx.clone(), idx.len(), &Device::Cpu)?;
        let k = Tensor::from_vec(keys, (rows, d), &Device::Cpu)?.index_select(&ids, 0)?.reshape((c1 - c0, window_len, d))?;
        let v = Tensor::from_vec(vals, (rows, dv), &Device::Cpu)?.index_select(&ids, 0)?.reshape((c1 - c0, window_len, dv))?;
        let q = Tensor::from_vec(mine[h].qk.concat(), (c1 - c0, spec.chunk_len, d), &Device::Cpu)?;
        let k_tok: Vec<i64> = idx.iter().map(|&i| tok[i as usize]).collect();
        let k_ok: Vec<bool> = idx.iter().map(|&i| ok[i as usize]).collect();
        let (out, lse) = lsh::chunk_attention(&q, &k, &v, &mine[h].tok, &k_tok, &k_ok)?;
        let out = out.flatten_all()?.to_vec1::<f32>()?;
        for (i, (o, l)) in out.chunks_exact(dv.max(1)).zip(lse).enumerate() {
            results[h][i] = (o.to_vec(), l);
        }
    }
    let replies = arrivals
        .iter()
        .map(|per_head| {
            let mut f = Vec::new();
            for (h, slots) in per_head.iter().enumerate() {
                let m = slots.len();
                let outs: Vec<f32> = slots.iter().flat_map(|&s| results[h][s - lo].0.iter().copied()).collect();
                let lses: Vec<f32> = slots.iter().map(|&s| results[h][s - lo].1).collect();
                f.push(Tensor::from_vec(outs, (m, dv), &Device::Cpu)?);
                f.push(Tensor::from_vec(lses, m, &Device::Cpu)?);
            }
            Ok(f)
        })
        .collect::<Result<Vec<Frame>>>()?;
    let answers = group.all_to_all(replies)?;

    // Rounds merged per token by log-sum-exp.
    let mut rounds: Vec<Vec<RoundPartials>> = vec![vec![Vec::new(); n]; heads];
    for (q, frame) in answers.iter().enumerate() {
        for h in 0..heads {
            let lses = frame[h * 2 + 1].to_vec1::<f32>()?;
            let outs = if lses.is_empty() { Vec::new() } else { frame[h * 2].to_vec2::<f32>()? };
            for (i, &(_, t)) in sent[q][h].iter().enumerate() {
                rounds[h][t].push((lses[i], outs[i].clone()));
            }
        }
    }
    let mut out = vec![0f32; heads * n * dv];
    for (h, per_head) in rounds.iter().enumerate() {
        for (t, rs) in per_head.iter().enumerate() {
            let m = rs.iter().map(|r| r.0).fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = rs.iter().map(|r| (r.0 - m).exp()).sum();
            let o = &mut out[(h * n + t) * dv..(h * n + t + 1) * dv];
            for (lse, x) in rs {
                let w = (lse - m).exp() / z;
                o.iter_mut().zip(x).for_each(|(a, b)| *a += w * b);
            }
        }
    }
    Ok(Tensor::from_vec(out, (heads, n, dv), &Device::Cpu)?)
}
