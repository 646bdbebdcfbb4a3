//! Global queries (Longformer's global tokens, BigBird's first and last blocks): queries that
//! attend to every key of the sequence. Their rows are all-gathered, every rank computes their
//! partial over the keys it owns, and the partials merge across ranks as (output, lse) in rank
//! order — so each rank ends with the same, exact result, without any rank holding all keys.

use candle_core::{Device, Tensor};
use tome_attn::{attention, Mask, Partial};

use super::keys::{select_rows, KeyBlock};
use crate::error::{DistError, Result};
use crate::group::Group;

/// Attention of the global queries over the whole sequence. `rows` are the indices (in this
/// rank's shard, positions `q_pos`) of the global queries this rank owns; `q` holds this
/// rank's queries; `own` the keys this rank owns. Returns the partial of every global query,
/// in ascending position order, with those positions.
pub(crate) fn global_queries(group: &dyn Group, q: &Tensor, q_pos: &[i64], rows: &[usize], own: &KeyBlock, scale: f32) -> Result<(Vec<i64>, Partial)> {
    let (heads, _, _) = q.dims3()?;
    let dv = own.v.dim(2)?;
    let mine_pos: Vec<i64> = rows.iter().map(|&i| q_pos[i]).collect();
    let frame = vec![select_rows(q, rows)?, Tensor::from_vec(mine_pos.clone(), mine_pos.len(), &Device::Cpu)?];
    let mut queries = Vec::with_capacity(group.size());
    let mut positions = Vec::new();
    for f in group.all_gather(frame)? {
        let [gq, pos]: [Tensor; 2] = f.try_into().map_err(|_| DistError::Plan("a global query frame has 2 tensors".into()))?;
        positions.extend(pos.to_vec1::<i64>()?);
        queries.push(gq);
    }
    // Ascending positions, whatever the layout.
    let mut order: Vec<usize> = (0..positions.len()).collect();
    order.sort_by_key(|&i| positions[i]);
    let positions: Vec<i64> = order.iter().map(|&i| positions[i]).collect();
    let all_q = select_rows(&Tensor::cat(&queries, 1)?, &order)?;

    let local = if own.is_empty() {
        Partial::empty(heads, positions.len(), dv)?
    } else {
        attention(&all_q, &own.k, &own.v, &Mask::full(&positions, &own.pos).with_key_valid(Some(&own.valid)), scale)?
    };
    let mut merged: Option<Partial> = None;
    for f in group.all_gather(vec![local.out, local.lse])? {
        let [out, lse]: [Tensor; 2] = f.try_into().map_err(|_| DistError::Plan("a global partial frame has 2 tensors".into()))?;
        let part = Partial { out, lse };
        merged = Some(match merged {
            None => part,
            Some(m) => m.merge(&part)?,
        });
    }
    let merged = merged.ok_or_else(|| DistError::Plan("no global partials".into()))?;
    Ok((positions, merged))
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
