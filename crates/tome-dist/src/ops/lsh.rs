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

use std::ops::Range;

use candle_core::{Device, Tensor};
use tome_attn::lsh::{self, LshSpec};

use crate::error::{DistError, Result};
use crate::group::{flags_to_tensor, tensor_to_flags, Frame, Group};
use crate::layout::ShardPlan;

/// Rows of one head held in sorted-slot space, flat: row `i`'s query-key vector at `i · d`, its
/// value at `i · dv` (one allocation per field, not one per row).
#[derive(Default, Clone)]
struct Rows {
    tok: Vec<i64>,
    valid: Vec<bool>,
    qk: Vec<f32>,
    v: Vec<f32>,
}

impl Rows {
    /// `m` rows to be filled by [`Rows::set`].
    fn with_len(m: usize, (d, dv): (usize, usize)) -> Self {
        Rows { tok: vec![0; m], valid: vec![false; m], qk: vec![0.0; m * d], v: vec![0.0; m * dv] }
    }

    fn push(&mut self, tok: i64, valid: bool, qk: &[f32], v: &[f32]) {
        self.tok.push(tok);
        self.valid.push(valid);
        self.qk.extend_from_slice(qk);
        self.v.extend_from_slice(v);
    }

    /// Row `at` := row `i` of `from`.
    fn set(&mut self, at: usize, from: &Rows, i: usize, (d, dv): (usize, usize)) {
        self.tok[at] = from.tok[i];
        self.valid[at] = from.valid[i];
        self.qk[at * d..(at + 1) * d].copy_from_slice(&from.qk[i * d..(i + 1) * d]);
        self.v[at * dv..(at + 1) * dv].copy_from_slice(&from.v[i * dv..(i + 1) * dv]);
    }

    /// Appends row `i` of `from`.
    fn push_row(&mut self, from: &Rows, i: usize, (d, dv): (usize, usize)) {
        self.push(from.tok[i], from.valid[i], &from.qk[i * d..(i + 1) * d], &from.v[i * dv..(i + 1) * dv]);
    }

    fn into_frame(self, (d, dv): (usize, usize)) -> Result<Frame> {
        let m = self.tok.len();
        Ok(vec![
            Tensor::from_vec(self.tok, m, &Device::Cpu)?,
            flags_to_tensor(&self.valid)?,
            Tensor::from_vec(self.qk, (m, d), &Device::Cpu)?,
            Tensor::from_vec(self.v, (m, dv), &Device::Cpu)?,
        ])
    }

    fn from_frame(f: &[Tensor]) -> Result<Self> {
        let [tok, valid, qk, v] = f else { return Err(DistError::Plan("an LSH row frame has 4 tensors per head".into())) };
        Ok(Rows { tok: tok.to_vec1::<i64>()?, valid: tensor_to_flags(valid)?, qk: qk.flatten_all()?.to_vec1::<f32>()?, v: v.flatten_all()?.to_vec1::<f32>()? })
    }
}

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
    let widths = (d, dv);
    let qk_rows = qk.flatten_all()?.to_vec1::<f32>()?;
    let v_rows = v.flatten_all()?.to_vec1::<f32>()?;
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
                let row = h * n + t;
                outgoing[q][h].0.push(slot as i64);
                outgoing[q][h].1.push(start + t as i64, valid[t], &qk_rows[row * d..(row + 1) * d], &v_rows[row * dv..(row + 1) * dv]);
                sent[q][h].push((r, t));
            }
        }
    }
    let parts = outgoing
        .into_iter()
        .map(|per_head| {
            let mut f = Vec::new();
            for (slots, rows) in per_head {
                f.push(Tensor::from_vec(slots.clone(), slots.len(), &Device::Cpu)?);
                f.extend(rows.into_frame(widths)?);
            }
            Ok(f)
        })
        .collect::<Result<Vec<Frame>>>()?;
    let received = group.all_to_all(parts)?;
    let mut mine = vec![Rows::with_len(hi - lo, widths); heads];
    let mut arrivals: Vec<Vec<Vec<usize>>> = vec![vec![Vec::new(); heads]; p]; // slots in arrival order
    for (src, frame) in received.iter().enumerate() {
        for h in 0..heads {
            let f = frame.get(h * 5..h * 5 + 5).ok_or_else(|| DistError::Plan(format!("rank {src} dealt a frame of {} tensors for {heads} heads", frame.len())))?;
            let slots = f[0].to_vec1::<i64>()?;
            let rows = Rows::from_frame(&f[1..])?;
            for (i, &s) in slots.iter().enumerate() {
                mine[h].set(s as usize - lo, &rows, i, widths);
                arrivals[src][h].push(s as usize);
            }
        }
    }

    // 3. The look-back and look-ahead chunks, wrapping around.
    let window = |c: usize| -> Vec<usize> {
        (0..=spec.chunks_before + spec.chunks_after).map(|o| (c + total_chunks * (spec.chunks_before + 1) + o - spec.chunks_before) % total_chunks).collect()
    };
    // Sorted slots outside rank q's own chunks that its chunks look at.
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
                sel.push_row(rows, s - lo, widths);
            }
            frame.extend(sel.into_frame(widths)?);
        }
        group.send(q, frame)?;
    }
    // The halo: row i of each head's table holds slot `my_needs[i]` (ascending).
    let my_needs: Vec<usize> = needs(me).into_iter().flatten().collect();
    let mut halo = vec![Rows::with_len(my_needs.len(), widths); heads];
    for q in (0..p).filter(|&q| q != me) {
        let from: Vec<usize> = (0..my_needs.len()).filter(|&i| owner(my_needs[i]) == q).collect();
        if from.is_empty() {
            continue;
        }
        let frame = group.recv(q)?;
        for (h, table) in halo.iter_mut().enumerate() {
            let rows = Rows::from_frame(frame.get(h * 4..h * 4 + 4).ok_or_else(|| DistError::Plan(format!("rank {q} sent a halo frame of {} tensors", frame.len())))?)?;
            if rows.tok.len() != from.len() {
                return Err(DistError::Plan(format!("rank {q} sent {} halo rows for head {h}, {} were needed", rows.tok.len(), from.len())));
            }
            for (i, &at) in from.iter().enumerate() {
                table.set(at, &rows, i, widths);
            }
        }
    }

    // 4. Attend my chunks (batched matrix products over every chunk of a head); send each
    //    item's (output, lse) home.
    let (c0, c1) = (lo / spec.chunk_len, hi / spec.chunk_len);
    let key_slots: Vec<usize> = (c0..c1).flat_map(window).flat_map(|kc| kc * spec.chunk_len..(kc + 1) * spec.chunk_len).collect();
    // Per head: each of my slots' output (`dv` wide) and lse.
    let mut results: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); heads];
    // Row of a slot in the table of my rows followed by the halo's.
    let row_of = |s: usize| -> Result<usize> {
        if (lo..hi).contains(&s) {
            Ok(s - lo)
        } else {
            my_needs.binary_search(&s).map(|i| hi - lo + i).map_err(|_| DistError::Plan(format!("slot {s} never arrived")))
        }
    };
    let idx: Vec<usize> = key_slots.iter().map(|&s| row_of(s)).collect::<Result<_>>()?;
    let window_len = if c1 > c0 { idx.len() / (c1 - c0) } else { 0 };
    for h in (0..heads).filter(|_| c1 > c0) {
        let (own, far) = (&mine[h], &halo[h]);
        let row = |i: usize| if i < hi - lo { (own, i) } else { (far, i - (hi - lo)) };
        // Keys and values of every chunk's window, gathered by row.
        let (mut k, mut v) = (vec![0f32; idx.len() * d], vec![0f32; idx.len() * dv]);
        let (mut k_tok, mut k_ok) = (Vec::with_capacity(idx.len()), Vec::with_capacity(idx.len()));
        for (j, &i) in idx.iter().enumerate() {
            let (table, i) = row(i);
            lsh::normalize_key_into(&table.qk[i * d..(i + 1) * d], &mut k[j * d..(j + 1) * d]);
            v[j * dv..(j + 1) * dv].copy_from_slice(&table.v[i * dv..(i + 1) * dv]);
            k_tok.push(table.tok[i]);
            k_ok.push(table.valid[i]);
        }
        let chunks = c1 - c0;
        let k = Tensor::from_vec(k, (chunks, window_len, d), &Device::Cpu)?;
        let v = Tensor::from_vec(v, (chunks, window_len, dv), &Device::Cpu)?;
        // The queries are this rank's rows, no longer needed as rows: moved, not copied.
        let q = Tensor::from_vec(std::mem::take(&mut mine[h].qk), (chunks, spec.chunk_len, d), &Device::Cpu)?;
        let (out, lse) = lsh::chunk_attention(&q, &k, &v, &mine[h].tok, &k_tok, &k_ok)?;
        results[h] = (out.flatten_all()?.to_vec1::<f32>()?, lse);
    }
    let replies = arrivals
        .iter()
        .map(|per_head| {
            let mut f = Vec::new();
            for (h, slots) in per_head.iter().enumerate() {
                let (outs, lses) = &results[h];
                let out: Vec<f32> = slots.iter().flat_map(|&s| &outs[(s - lo) * dv..(s - lo + 1) * dv]).copied().collect();
                let lse: Vec<f32> = slots.iter().map(|&s| lses[s - lo]).collect();
                f.push(Tensor::from_vec(out, (slots.len(), dv), &Device::Cpu)?);
                f.push(Tensor::from_vec(lse, slots.len(), &Device::Cpu)?);
            }
            Ok(f)
        })
        .collect::<Result<Vec<Frame>>>()?;
    let answers = group.all_to_all(replies)?;

    // Rounds merged per token by log-sum-exp, in round order whichever rank answered.
    let rounds = spec.n_hashes;
    let mut lses = vec![f32::NEG_INFINITY; heads * n * rounds];
    let mut outs = vec![0f32; heads * n * rounds * dv];
    for (q, frame) in answers.iter().enumerate() {
        for (h, items) in sent[q].iter().enumerate() {
            let (Some(o), Some(l)) = (frame.get(h * 2), frame.get(h * 2 + 1)) else {
                return Err(DistError::Plan(format!("rank {q} answered with a frame of {} tensors for {heads} heads", frame.len())));
            };
            let (o, l) = (o.flatten_all()?.to_vec1::<f32>()?, l.to_vec1::<f32>()?);
            if l.len() != items.len() || o.len() != l.len() * dv {
                return Err(DistError::Plan(format!("rank {q} answered {} items of head {h}, {} were sent", l.len(), items.len())));
            }
            for (i, &(r, t)) in items.iter().enumerate() {
                let at = (h * n + t) * rounds + r;
                lses[at] = l[i];
                outs[at * dv..(at + 1) * dv].copy_from_slice(&o[i * dv..(i + 1) * dv]);
            }
        }
    }
    let mut out = vec![0f32; heads * n * dv];
    if dv > 0 {
        let per_token = lses.chunks_exact(rounds).zip(outs.chunks_exact(rounds * dv));
        for (o, (l, x)) in out.chunks_exact_mut(dv).zip(per_token) {
            let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = l.iter().map(|r| (r - m).exp()).sum();
            for (lse, x) in l.iter().zip(x.chunks_exact(dv)) {
                let w = (lse - m).exp() / z;
                o.iter_mut().zip(x).for_each(|(a, b)| *a += w * b);
            }
        }
    }
    Ok(Tensor::from_vec(out, (heads, n, dv), &Device::Cpu)?)
}
