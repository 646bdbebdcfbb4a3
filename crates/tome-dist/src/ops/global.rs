//! Global queries (Longformer's global tokens, BigBird's first and last blocks): queries that
//! attend to every key of the sequence. Their rows are all-gathered, every rank computes their
//! partial over the keys it owns, and the partials merge across ranks as (output, lse) in rank
//! order — so each rank ends with the same, exact result, without any rank holding all keys.

use candle_core::{Device, Tensor};
use tome_attn::{attention_in, Mask, Partial, Precision};

use super::keys::{select_rows, KeyBlock};
use crate::error::{DistError, Result};
use crate::group::Group;

/// Attention of the global queries over the whole sequence. `rows` are the indices (in this
/// rank's shard, positions `q_pos`) of the global queries this rank owns; `q` holds this
/// rank's queries; `own` the keys this rank owns. Returns the partial of every global query,
/// in ascending position order, with those positions. `precision`: as `attention_in`.
pub(crate) fn global_queries(group: &dyn Group, q: &Tensor, q_pos: &[i64], rows: &[usize], own: &KeyBlock, scale: f32, precision: Precision) -> Result<(Vec<i64>, Partial)> {
    let (heads, _, _) = q.dims3()?;
    let dv = own.v.dim(2)?;
    let (positions, all_q) = gather_global_queries(group, select_rows(q, rows)?, rows.iter().map(|&i| q_pos[i]).collect())?;
    let local = if own.is_empty() {
        Partial::empty(heads, positions.len(), dv)?
    } else {
        attention_in(precision, &all_q, &own.k, &own.v, &Mask::full(&positions, &own.pos).with_key_valid(Some(&own.valid)), scale)?
    };
    Ok((positions, merge_global_partials(group, local)?))
}

/// The first exchange of global queries: every rank's global query rows (`mine`, `[heads, m, d]`
/// at positions `mine_pos`) to every rank. Returns all of them, `[heads, g, d]`, with their
/// positions, ascending whatever the layout.
pub fn gather_global_queries(group: &dyn Group, mine: Tensor, mine_pos: Vec<i64>) -> Result<(Vec<i64>, Tensor)> {
    let frame = vec![mine, Tensor::from_vec(mine_pos.clone(), mine_pos.len(), &Device::Cpu)?];
    let mut queries = Vec::with_capacity(group.size());
    let mut positions = Vec::new();
    for f in group.all_gather(frame)? {
        let [gq, pos]: [Tensor; 2] = f.try_into().map_err(|_| DistError::Plan("a global query frame has 2 tensors".into()))?;
        positions.extend(pos.to_vec1::<i64>()?);
        queries.push(gq);
    }
    let mut order: Vec<usize> = (0..positions.len()).collect();
    order.sort_by_key(|&i| positions[i]);
    let positions: Vec<i64> = order.iter().map(|&i| positions[i]).collect();
    Ok((positions, select_rows(&Tensor::cat(&queries, 1)?, &order)?))
}

/// The second exchange of global queries: each rank's partial of every global query over the
/// keys it owns, merged over ranks as (output, lse) in rank order — the same result on every
/// rank.
pub fn merge_global_partials(group: &dyn Group, local: Partial) -> Result<Partial> {
    let mut merged: Option<Partial> = None;
    for f in group.all_gather(vec![local.out, local.lse])? {
        let [out, lse]: [Tensor; 2] = f.try_into().map_err(|_| DistError::Plan("a global partial frame has 2 tensors".into()))?;
        let part = Partial { out, lse };
        merged = Some(match merged {
            None => part,
            Some(m) => m.merge(&part)?,
        });
    }
    merged.ok_or_else(|| DistError::Plan("no global partials".into()))
}

/// Every rank's global key rows (`mine`: this rank's), in ascending position order on every
/// rank: the keys every query sees under Longformer's global tokens.
pub fn gather_global_keys(group: &dyn Group, mine: &KeyBlock) -> Result<KeyBlock> {
    let blocks = group.all_gather(mine.to_frame()?)?.into_iter().map(KeyBlock::from_frame).collect::<Result<Vec<_>>>()?;
    let all = KeyBlock::concat(&blocks)?;
    let mut order: Vec<usize> = (0..all.len()).collect();
    order.sort_by_key(|&i| all.pos[i]);
    all.select(&order)
}

/// `out` (`[heads, n, dv]`, positions `q_pos`) with the rows at `rows` replaced by the matching
/// rows of `global` (positions `global_pos`, ascending).
pub(crate) fn overwrite_rows(out: &Tensor, q_pos: &[i64], rows: &[usize], global_pos: &[i64], global: &Tensor) -> Result<Tensor> {
    if rows.is_empty() {
        return Ok(out.clone());
    }
    let (heads, n, dv) = out.dims3()?;
    let g = global_pos.len();
    let mut data = out.flatten_all()?.to_vec1::<f32>()?;
    let src = global.flatten_all()?.to_vec1::<f32>()?;
    for &i in rows {
        let gi = global_pos.partition_point(|&x| x < q_pos[i]);
        for h in 0..heads {
            let (dst, from) = ((h * n + i) * dv, (h * g + gi) * dv);
            data[dst..dst + dv].copy_from_slice(&src[from..from + dv]);
        }
    }
    Ok(Tensor::from_vec(data, (heads, n, dv), &Device::Cpu)?)
}
