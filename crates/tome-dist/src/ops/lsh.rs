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

/// Tensors per head in a frame of [`Rows`]: token positions, validity flags, query-key
/// vectors, values.
const ROWS_TENSORS: usize = 4;
/// Tensors per head in a frame dealing items to a slot's owner: the slots, then the rows.
const DEALT_TENSORS: usize = 1 + ROWS_TENSORS;
/// Tensors per head in a frame answering dealt items: outputs `[items, dv]`, log-sum-exps.
const ANSWER_TENSORS: usize = 2;

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

    /// Rows as a peer sent them, each field checked to hold the same number of rows.
    fn from_frame(f: &[Tensor], (d, dv): (usize, usize)) -> Result<Self> {
        let [tok, valid, qk, v] = f else { return Err(DistError::Plan(format!("an LSH row frame has {ROWS_TENSORS} tensors per head"))) };
        let rows = Rows { tok: tok.to_vec1::<i64>()?, valid: tensor_to_flags(valid)?, qk: qk.flatten_all()?.to_vec1::<f32>()?, v: v.flatten_all()?.to_vec1::<f32>()? };
        let m = rows.tok.len();
        if rows.valid.len() != m || rows.qk.len() != m * d || rows.v.len() != m * dv {
            return Err(DistError::Plan(format!(
                "an LSH row frame of {m} rows has {} flags, {} query-key and {} value numbers ({d} and {dv} wide)",
                rows.valid.len(),
                rows.qk.len(),
                rows.v.len()
            )));
        }
        Ok(rows)
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

/// Checks every rank's bucket histogram before slots are derived from it: `heads ·
/// keys_per_head` counts, each head's summing to the rank's tokens times the hash rounds.
/// Every slot derived from them then lies within the document's.
fn check_histograms(all_counts: &[Vec<u32>], plan: &ShardPlan, heads: usize, keys_per_head: usize, rounds: usize) -> Result<()> {
    for (q, counts) in all_counts.iter().enumerate() {
        if counts.len() != heads * keys_per_head {
            return Err(DistError::Plan(format!("rank {q} sent a histogram of {} counts; {heads} heads of {keys_per_head} keys were expected", counts.len())));
        }
        let items = rounds * plan.ranges(q).iter().map(|r| r.len()).sum::<usize>();
        for (h, per_head) in counts.chunks_exact(keys_per_head.max(1)).enumerate() {
            let sum: usize = per_head.iter().map(|&c| c as usize).sum();
            if sum != items {
                return Err(DistError::Plan(format!("rank {q} counted {sum} items for head {h}; it holds {items}")));
            }
        }
    }
    Ok(())
}

/// Per source rank and head, the slots its items were dealt, in arrival order.
type Arrivals = Vec<Vec<Vec<usize>>>;

/// The items dealt to this rank, whose slots are `slots`: per head, the rows in slot order, and
/// per source rank and head, the slots it sent in arrival order (its answers go back in that
/// order). Every slot must arrive exactly once, with a row of the right widths.
fn take_dealt(received: &[Frame], heads: usize, slots: Range<usize>, widths: (usize, usize)) -> Result<(Vec<Rows>, Arrivals)> {
    let len = slots.len();
    let mut mine = vec![Rows::with_len(len, widths); heads];
    let mut filled = vec![vec![false; len]; heads];
    let mut arrivals: Arrivals = vec![vec![Vec::new(); heads]; received.len()];
    for (src, frame) in received.iter().enumerate() {
        for h in 0..heads {
            let f = frame
                .get(h * DEALT_TENSORS..(h + 1) * DEALT_TENSORS)
                .ok_or_else(|| DistError::Plan(format!("rank {src} dealt a frame of {} tensors for {heads} heads", frame.len())))?;
            let dealt = f[0].to_vec1::<i64>()?;
            let rows = Rows::from_frame(&f[1..], widths)?;
            if rows.tok.len() != dealt.len() {
                return Err(DistError::Plan(format!("rank {src} dealt {} slots with {} rows for head {h}", dealt.len(), rows.tok.len())));
            }
            for (i, &s) in dealt.iter().enumerate() {
                let at = usize::try_from(s)
                    .ok()
                    .filter(|s| slots.contains(s))
                    .map(|s| s - slots.start)
                    .ok_or_else(|| DistError::Plan(format!("rank {src} dealt slot {s} of head {h}; this rank holds slots {slots:?}")))?;
                if std::mem::replace(&mut filled[h][at], true) {
                    return Err(DistError::Plan(format!("slot {s} of head {h} was dealt twice")));
                }
                mine[h].set(at, &rows, i, widths);
                arrivals[src][h].push(at + slots.start);
            }
        }
    }
    if let Some((h, at)) = filled.iter().enumerate().find_map(|(h, f)| f.iter().position(|x| !x).map(|at| (h, at))) {
        return Err(DistError::Plan(format!("slot {} of head {h} was never dealt", at + slots.start)));
    }
    Ok((mine, arrivals))
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
    let mut counts = vec![0u32; heads * keys_per_head];
    for (h, per_head) in b.iter().enumerate() {
        for (r, per_round) in per_head.iter().enumerate() {
            for &bucket in per_round {
                counts[h * keys_per_head + r * nb + bucket] += 1;
            }
        }
    }
    let all_counts: Vec<Vec<u32>> = group
        .all_gather(vec![Tensor::from_vec(counts, heads * keys_per_head, &Device::Cpu)?])?
        .into_iter()
        .map(|f| f.first().map(|t| t.to_vec1::<u32>()).transpose())
        .collect::<candle_core::Result<Option<Vec<_>>>>()?
        .ok_or_else(|| DistError::Plan("an empty histogram frame".into()))?;
    check_histograms(&all_counts, plan, heads, keys_per_head, spec.n_hashes)?;
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
            let smaller: usize = all_counts.iter().map(|c| c[h * keys_per_head..h * keys_per_head + key].iter().map(|&x| x as usize).sum::<usize>()).sum();
            let earlier: usize = all_counts[..me].iter().map(|c| c[h * keys_per_head + key] as usize).sum();
            next[key] = smaller + earlier;
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
    let (mut mine, arrivals) = take_dealt(&received, heads, lo..hi, widths)?;

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
            let part = frame.get(h * ROWS_TENSORS..(h + 1) * ROWS_TENSORS).ok_or_else(|| DistError::Plan(format!("rank {q} sent a halo frame of {} tensors", frame.len())))?;
            let rows = Rows::from_frame(part, widths)?;
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
            let (Some(o), Some(l)) = (frame.get(h * ANSWER_TENSORS), frame.get(h * ANSWER_TENSORS + 1)) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;

    const WIDTHS: (usize, usize) = (2, 1);

    /// One head's dealt frame: `slots` with a row each (token = slot, all valid).
    fn dealt(slots: &[i64]) -> Frame {
        let mut rows = Rows::default();
        for &s in slots {
            rows.push(s, true, &[s as f32, 0.5], &[1.0]);
        }
        let mut f = vec![Tensor::from_vec(slots.to_vec(), slots.len(), &Device::Cpu).unwrap()];
        f.extend(rows.into_frame(WIDTHS).unwrap());
        f
    }

    #[test]
    fn dealt_items_fill_every_slot_once_whichever_rank_sent_them() {
        let (mine, arrivals) = take_dealt(&[dealt(&[5, 3]), dealt(&[4])], 1, 3..6, WIDTHS).unwrap();
        assert_eq!(mine[0].tok, vec![3, 4, 5]);
        assert_eq!(mine[0].qk, vec![3.0, 0.5, 4.0, 0.5, 5.0, 0.5]);
        assert_eq!(arrivals, vec![vec![vec![5, 3]], vec![vec![4]]]);
    }

    #[test]
    fn a_peers_dealt_frame_out_of_range_twice_short_or_incomplete_is_an_error_not_a_panic() {
        let err = |received: &[Frame]| take_dealt(received, 1, 3..6, WIDTHS).err().unwrap().to_string();
        assert!(err(&[dealt(&[2, 3, 4])]).contains("dealt slot 2"), "below the rank's slots");
        assert!(err(&[dealt(&[3, 4, 9])]).contains("dealt slot 9"), "beyond them");
        assert!(err(&[dealt(&[-1, 4, 5])]).contains("dealt slot -1"));
        assert!(err(&[dealt(&[3, 4]), dealt(&[4])]).contains("dealt twice"));
        assert!(err(&[dealt(&[3, 4])]).contains("slot 5 of head 0 was never dealt"));
        let mut short = dealt(&[3, 4, 5]);
        short[3] = Tensor::from_vec(vec![0f32; 5], 5, &Device::Cpu).unwrap();
        assert!(err(&[short]).contains("query-key"), "a query-key tensor one number short");
        let mut fewer_rows = dealt(&[3, 4, 5]);
        fewer_rows[0] = Tensor::from_vec(vec![3i64, 4, 5, 6], 4, &Device::Cpu).unwrap();
        assert!(err(&[fewer_rows]).contains("4 slots with 3 rows"));
        assert!(err(&[dealt(&[3, 4, 5])[..3].to_vec()]).contains("frame of 3 tensors"));
    }

    #[test]
    fn histograms_count_exactly_the_ranks_items() {
        let plan = ShardPlan::new(Layout::Contiguous, 6, 2).unwrap();
        let ok = vec![vec![1, 2, 0, 3], vec![3, 0, 1, 2]];
        check_histograms(&ok, &plan, 2, 2, 1).unwrap();
        let with = |q: usize, i: usize, x: u32| {
            let mut c = ok.clone();
            c[q][i] = x;
            check_histograms(&c, &plan, 2, 2, 1).err().unwrap().to_string()
        };
        assert!(with(0, 1, 4).contains("counted 5 items for head 0; it holds 3"));
        assert!(with(1, 2, u32::MAX).contains("for head 1; it holds 3"));
        let short = vec![ok[0][..3].to_vec(), ok[1].clone()];
        assert!(check_histograms(&short, &plan, 2, 2, 1).unwrap_err().to_string().contains("histogram of 3 counts"));
    }
}
