//! A block of keys as it travels between ranks: keys, values, positions and validity.

use candle_core::Tensor;

use crate::error::{DistError, Result};
use crate::group::{flags_to_tensor, tensor_to_flags, Frame};

/// Keys `[kv_heads, n, d]`, values `[kv_heads, n, dv]`, their global positions (ascending) and
/// whether each may be attended to.
#[derive(Clone, Debug)]
pub struct KeyBlock {
    pub k: Tensor,
    pub v: Tensor,
    pub pos: Vec<i64>,
    pub valid: Vec<bool>,
}

impl KeyBlock {
    pub fn len(&self) -> usize {
        self.pos.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }

    /// The block as one frame, for the wire when the receiver cannot derive the positions
    /// itself: keys, values, positions, validity.
    pub fn to_frame(&self) -> Result<Frame> {
        let pos = Tensor::from_vec(self.pos.clone(), self.pos.len(), &candle_core::Device::Cpu)?;
        Ok(vec![self.k.clone(), self.v.clone(), pos, flags_to_tensor(&self.valid)?])
    }

    /// A block read back from [`KeyBlock::to_frame`]'s frame.
    pub fn from_frame(frame: Frame) -> Result<Self> {
        let [k, v, pos, valid]: [Tensor; 4] = frame.try_into().map_err(|f: Frame| DistError::Plan(format!("a key frame has 4 tensors, got {}", f.len())))?;
        Ok(KeyBlock { k, v, pos: pos.to_vec1::<i64>()?, valid: tensor_to_flags(&valid)? })
    }

    /// Rows `start..start + len` of this block.
    pub(crate) fn rows(&self, start: usize, len: usize) -> Result<KeyBlock> {
        Ok(KeyBlock {
            k: self.k.narrow(1, start, len)?,
            v: self.v.narrow(1, start, len)?,
            pos: self.pos[start..start + len].to_vec(),
            valid: self.valid[start..start + len].to_vec(),
        })
    }

    /// Blocks joined in the order given (callers pass them in ascending position order).
    pub(crate) fn concat(blocks: &[KeyBlock]) -> Result<KeyBlock> {
        let first = blocks.first().ok_or_else(|| DistError::Plan("no key blocks to join".into()))?;
        if blocks.len() == 1 {
            return Ok(first.clone());
        }
        let ks: Vec<&Tensor> = blocks.iter().map(|b| &b.k).collect();
        let vs: Vec<&Tensor> = blocks.iter().map(|b| &b.v).collect();
        Ok(KeyBlock {
            k: Tensor::cat(&ks, 1)?,
            v: Tensor::cat(&vs, 1)?,
            pos: blocks.iter().flat_map(|b| b.pos.iter().copied()).collect(),
            valid: blocks.iter().flat_map(|b| b.valid.iter().copied()).collect(),
        })
    }

    /// The rows at `idx` (in that order).
    pub(crate) fn select(&self, idx: &[usize]) -> Result<KeyBlock> {
        Ok(KeyBlock {
            k: select_rows(&self.k, idx)?,
            v: select_rows(&self.v, idx)?,
            pos: idx.iter().map(|&i| self.pos[i]).collect(),
            valid: idx.iter().map(|&i| self.valid[i]).collect(),
        })
    }
}

/// Rows `idx` (dimension 1) of a `[heads, rows, dim]` tensor, contiguous.
pub(crate) fn select_rows(t: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    let ids = Tensor::from_vec(ids, idx.len(), &candle_core::Device::Cpu)?;
    Ok(t.contiguous()?.index_select(&ids, 1)?.contiguous()?)
}
