//! A document as the models run it: checked and prepared once for the whole sequence
//! ([`Prepared`]), then cut into what each rank needs ([`ShardInput`]), which is also what
//! travels to a worker.

use std::ops::Range;

use tome_attn::Precision;
use tome_dist::{Layout, ShardPlan};

use crate::config::LayerAttention;
use crate::error::{ModelError, Result};

/// A document checked against the model and options, ready to be sharded: token ids, the
/// learned position each token uses, each layer's attention, and how the run is cut.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub ids: Vec<u32>,
    pub position_ids: Vec<u32>,
    /// Each layer's attention (one entry per layer: progress counts them).
    pub layers: Vec<LayerAttention>,
    pub global_tokens: Vec<usize>,
    pub run: RunOptions,
}

/// What every rank of a document's run shares beyond the tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Return the hidden states after this many layers (Hugging Face's `hidden_states[k]`:
    /// 0 is the embeddings, the layer count the last hidden state); `None` for the last.
    pub output_layer: Option<usize>,
    /// Segment-recurrent models (Transformer-XL, Compressive): tokens per segment. Shards then
    /// hold whole segments.
    pub segment_len: Option<usize>,
    /// The arithmetic of the products and attention inputs ([`Precision::F32`] unless asked).
    pub precision: Precision,
}

/// What one rank needs of a prepared document: its own tokens (in the order of the plan's
/// positions for the rank) and what every rank shares. This is what travels to a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardInput {
    pub ids: Vec<u32>,
    pub position_ids: Vec<u32>,
    pub layers: Vec<LayerAttention>,
    pub global_tokens: Vec<usize>,
    pub run: RunOptions,
}

impl Prepared {
    /// A document whose tokens take positions 0..n and whose every layer runs `attention`.
    pub fn plain(ids: Vec<u32>, attention: Vec<LayerAttention>, run: RunOptions) -> Self {
        let n = ids.len() as u32;
        Prepared { ids, position_ids: (0..n).collect(), layers: attention, global_tokens: Vec::new(), run }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The shard plan for `ranks` ranks: the layout asked for; for architectures whose state
    /// follows token order (their own attention: LSH, expert capacity, segment memories) only
    /// the contiguous layout, in whole segments for segment-recurrent models.
    pub fn plan(&self, layout: Layout, ranks: usize) -> Result<ShardPlan> {
        if layout != Layout::Contiguous && self.layers.iter().any(|l| matches!(l, LayerAttention::Native(_))) {
            // LSH ties, expert capacity and segment memories all follow token order.
            return Err(ModelError::Unsupported("this architecture keeps tokens in order across ranks: it needs the contiguous layout".into()));
        }
        match self.run.segment_len {
            None => Ok(ShardPlan::new(layout, self.len(), ranks)?),
            Some(_) if layout != Layout::Contiguous => Err(ModelError::Unsupported("a segment-recurrent model processes segments in order: it needs the contiguous layout".into())),
            Some(segment) => Ok(ShardPlan::aligned(self.len(), ranks, segment)?),
        }
    }

    /// The id that follows each of rank `rank`'s tokens, in its row order (the document's last
    /// token, the rank's last row, has none).
    pub fn next_ids(&self, plan: &ShardPlan, rank: usize) -> Vec<u32> {
        plan.positions(rank).iter().filter_map(|&p| self.ids.get(p as usize + 1).copied()).collect()
    }

    /// How many layers run (progress counts them).
    pub fn layers_run(&self) -> usize {
        self.run.output_layer.unwrap_or(self.layers.len()).min(self.layers.len())
    }

    /// Rank `rank`'s part of the document under `plan`.
    pub fn shard(&self, plan: &ShardPlan, rank: usize) -> ShardInput {
        let positions = plan.positions(rank);
        ShardInput {
            ids: positions.iter().map(|&p| self.ids[p as usize]).collect(),
            position_ids: positions.iter().map(|&p| self.position_ids[p as usize]).collect(),
            layers: self.layers.clone(),
            global_tokens: self.global_tokens.clone(),
            run: self.run,
        }
    }
}

impl ShardInput {
    /// How many layers run (progress counts them).
    pub fn layers_run(&self) -> usize {
        self.run.output_layer.unwrap_or(self.layers.len()).min(self.layers.len())
    }
}

impl RunOptions {
    /// Checks the options against a model of `layers` layers; returns how many layers to run.
    pub fn layers_to_run(&self, layers: usize) -> Result<usize> {
        match self.output_layer {
            None => Ok(layers),
            Some(k) if k <= layers => Ok(k),
            Some(k) => Err(ModelError::Input(format!("hidden states of layer {k} were asked for; the model has {layers} layers (0 is the embeddings)"))),
        }
    }
}

/// `plan` with `pad` more positions (padding after the document) on the rank that holds the
/// document's last token, for architectures that pad to whole chunks or blocks as transformers
/// does (Reformer, BigBird): padding never travels, it is made where it is needed.
pub(crate) fn padded_plan(plan: &ShardPlan, pad: usize) -> Result<ShardPlan> {
    if pad == 0 {
        return Ok(plan.clone());
    }
    let len = plan.len();
    let shards: Vec<Vec<Range<usize>>> = (0..plan.ranks()).map(|r| plan.ranges(r).iter().map(|g| if g.end == len { g.start..len + pad } else { g.clone() }).collect()).collect();
    Ok(ShardPlan::from_ranges(len + pad, shards)?)
}
