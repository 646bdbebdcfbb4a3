//! The seam every architecture plugs into. [`Architecture`] is all the services use of a
//! model: describe it, prepare a document, run a rank's shard and, where the architecture can,
//! score each token given the ones before it. A capability an architecture lacks keeps the
//! trait's default, which refuses or states the general case. [`Model`] is a loaded
//! architecture; which `model_type` loads which architecture is said once, in
//! [`crate::registry`].

use candle_core::{Device, Module, Tensor};
use candle_nn::Embedding;
use tome_attn::Precision;
use tome_dist::{Group, ShardPlan};

use crate::config::{EncodeOptions, LayerAttention};
use crate::document::{Prepared, RunOptions, ShardInput};
use crate::error::{ModelError, Result};
use crate::gpu::GpuRank;

/// One architecture: a file in this crate that implements it, and a line in the registry.
pub trait Architecture: Send + Sync {
    /// What the model is, in the numbers the services plan and describe with.
    fn shape(&self) -> Shape;

    /// Checks a whole document against the model and options and derives per-token
    /// positions and each layer's attention.
    fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared>;

    /// Runs a rank's shard from its own tokens; returns its rows of the hidden states the run
    /// asks for. `after_layer(l)` is called when layer `l` is done; returning false cancels.
    fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor>;

    /// [`Architecture::forward`] with the rank's activations on a GPU (`rank`). Architectures
    /// without a GPU forward keep this default, which refuses by name.
    fn forward_gpu(&self, _rank: &GpuRank, _group: &dyn Group, _plan: &ShardPlan, _input: &ShardInput, _after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        Err(no_gpu_forward(&self.shape().model_type))
    }

    /// The shortest document the model runs.
    fn min_tokens(&self) -> usize {
        1
    }

    /// The precisions its CPU forward implements; f32 alone unless it says more.
    fn precisions(&self) -> &'static [Precision] {
        &[Precision::F32]
    }

    /// The precisions its GPU forward implements; none unless it has one.
    fn gpu_precisions(&self) -> &'static [Precision] {
        &[]
    }

    /// Frees its weights on GPU `gpu` in `precision`, if it uploaded them (the next GPU rank
    /// there uploads them again).
    fn release_gpu(&self, _gpu: usize, _precision: Precision) {}

    /// log p(next token | tokens so far) for the first `next_ids.len()` rows of `hidden`.
    /// Causal language models only: this default refuses.
    fn log_probs(&self, _hidden: &Tensor, _next_ids: &[u32]) -> Result<Tensor> {
        Err(ModelError::Unsupported("log-probabilities need a causal language model; this is an encoder".into()))
    }
}

/// A loaded architecture.
pub struct Model(Box<dyn Architecture>);

/// What a model is, in the numbers the services plan and describe with.
#[derive(Clone, Debug)]
pub struct Shape {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Query heads per attention layer.
    pub num_heads: usize,
    /// Rows of memory a segment-recurrent layer attends to beside its segment (memory and
    /// compressed memory); 0 for other architectures.
    pub memory_len: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    /// Longest document without a position extension; `None` when positions are relative
    /// (any length runs).
    pub max_positions: Option<usize>,
    /// Each layer's attention, as the config says.
    pub layer_attention: Vec<String>,
    /// A causal language model: it scores tokens (log-probabilities, perplexity).
    pub causal: bool,
}

impl Model {
    pub fn new(architecture: impl Architecture + 'static) -> Self {
        Model(Box::new(architecture))
    }

    pub fn shape(&self) -> Shape {
        self.0.shape()
    }

    /// The shortest document the model runs (Reformer's LSH layers need more than one chunk).
    pub fn min_tokens(&self) -> usize {
        self.0.min_tokens()
    }

    /// Refuses a precision the architecture implements on no device, naming it and what it
    /// runs in.
    pub fn check_precision(&self, precision: Precision) -> Result<()> {
        if self.gpu_precisions().contains(&precision) {
            return Ok(());
        }
        self.check_precision_on(precision, false)
    }

    /// Refuses a precision the architecture does not implement on a GPU (`on_gpu`) or a CPU,
    /// naming it and what it runs in there.
    pub fn check_precision_on(&self, precision: Precision, on_gpu: bool) -> Result<()> {
        let offered = if on_gpu { self.gpu_precisions() } else { self.precisions() };
        if offered.contains(&precision) {
            return Ok(());
        }
        let model = self.0.shape().model_type;
        if on_gpu && offered.is_empty() {
            return Err(no_gpu_forward(&model));
        }
        if !on_gpu && self.gpu_precisions().contains(&precision) {
            return Err(ModelError::Unsupported(format!("{model} runs in {precision} on GPU ranks only (--device cuda); CPU ranks compute in {}", names(offered))));
        }
        let device = if on_gpu { "GPU" } else { "CPU" };
        Err(ModelError::Unsupported(format!("{model} runs in {} on {device} ranks; {precision} is not implemented for it", names(offered))))
    }

    /// The precisions its CPU forward implements.
    pub fn precisions(&self) -> &'static [Precision] {
        self.0.precisions()
    }

    /// The precisions its GPU forward implements (none for an architecture without one).
    pub fn gpu_precisions(&self) -> &'static [Precision] {
        self.0.gpu_precisions()
    }

    /// Frees its weights on GPU `gpu` in `precision`, once no rank there is running.
    pub fn release_gpu(&self, gpu: usize, precision: Precision) {
        self.0.release_gpu(gpu, precision)
    }

    pub fn is_causal(&self) -> bool {
        self.0.shape().causal
    }

    /// Checks a whole document against the model and options and derives per-token positions.
    pub fn prepare(&self, ids: Vec<u32>, opts: &EncodeOptions) -> Result<Prepared> {
        self.check_precision(opts.precision)?;
        let doc = self.0.prepare(ids, opts)?;
        if opts.segment_len.is_some() && doc.run.segment_len.is_none() {
            return Err(ModelError::Input("a segment length applies to segment-recurrent models (Transformer-XL, Compressive) only".into()));
        }
        doc.run.layers_to_run(self.shape().num_layers)?;
        Ok(doc)
    }

    /// Runs a rank's shard; returns its rows of the last hidden state. `after_layer(l)` is
    /// called when layer `l` is done; returning false cancels.
    pub fn forward(&self, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        self.check_precision_on(input.run.precision, false)?;
        self.0.forward(group, plan, input, after_layer)
    }

    /// [`Model::forward`] on `gpu` where one is given, on the CPU otherwise.
    pub fn forward_on(&self, gpu: Option<&GpuRank>, group: &dyn Group, plan: &ShardPlan, input: &ShardInput, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        match gpu {
            None => self.forward(group, plan, input, after_layer),
            Some(rank) => {
                self.check_precision_on(input.run.precision, true)?;
                rank.check_precision(input.run.precision)?;
                let hidden = self.0.forward_gpu(rank, group, plan, input, after_layer)?;
                if input.run.precision == Precision::F16 {
                    check_f16_range(&hidden, group.rank())?;
                }
                Ok(hidden)
            }
        }
    }

    /// As [`Model::forward`] for rank `group.rank()` of a prepared document.
    pub fn forward_shard(&self, group: &dyn Group, plan: &ShardPlan, doc: &Prepared, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<Tensor> {
        self.forward(group, plan, &doc.shard(plan, group.rank()), after_layer)
    }

    /// log p(next token | tokens so far) for the first `next_ids.len()` rows of `hidden`.
    pub fn log_probs(&self, hidden: &Tensor, next_ids: &[u32]) -> Result<Tensor> {
        self.0.log_probs(hidden, next_ids)
    }
}

/// An f16 run's hidden rows, refused where an activation left f16's range on the way (past
/// 65504 it became infinite, and the next norm made it NaN): such a document needs bf16 or f32.
fn check_f16_range(hidden: &Tensor, rank: usize) -> Result<()> {
    let values = hidden.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
    let lost = values.iter().filter(|x| !x.is_finite()).count();
    if lost > 0 {
        return Err(ModelError::Input(format!(
            "f16 overflowed on rank {rank}: {lost} of its {} hidden values are infinite or NaN (an activation passed f16's largest value, 65504); run this document in bf16 or f32",
            values.len()
        )));
    }
    Ok(())
}

/// The refusal of an architecture without a GPU forward on a GPU rank.
fn no_gpu_forward(model_type: &str) -> ModelError {
    ModelError::Unsupported(format!("{model_type} does not run on a GPU rank yet (the BERT family, GPT-2, GPT-Neo and Llama do); run it with --device cpu"))
}

fn names(precisions: &[Precision]) -> String {
    if precisions.is_empty() {
        return "nothing".into();
    }
    precisions.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
}

/// Checks that a model whose attention its architecture fixes gets no attention options.
pub(crate) fn fixed_attention(opts: &EncodeOptions) -> Result<()> {
    if opts.attention.is_some() {
        return Err(ModelError::Unsupported("this architecture defines its own attention; an override would change its outputs".into()));
    }
    if !opts.global_tokens.is_empty() {
        return Err(ModelError::Input("global tokens need window attention; this architecture defines its own".into()));
    }
    Ok(())
}

/// Checks a causal model's options: dense attention only, no global tokens.
pub(crate) fn causal_only(opts: &EncodeOptions) -> Result<()> {
    if let Some(attention) = opts.attention.filter(|a| *a != LayerAttention::Dense) {
        return Err(ModelError::Unsupported(format!("this causal model runs dense causal attention in every layer; `{attention}` would change its outputs")));
    }
    if !opts.global_tokens.is_empty() {
        return Err(ModelError::Input("global tokens need window attention; this causal model attends densely".into()));
    }
    Ok(())
}

/// The run options of a model without segments.
pub(crate) fn plain_run(opts: &EncodeOptions) -> RunOptions {
    RunOptions { output_layer: opts.output_layer, segment_len: None, precision: opts.precision }
}

/// Refuses token ids outside a vocabulary of `vocab`, naming the first.
pub(crate) fn check_vocab(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        Some((i, id)) => Err(ModelError::Input(format!("token {i} has id {id}, beyond the vocabulary of {vocab}"))),
        None => Ok(()),
    }
}

/// Token plus learned absolute position embeddings of a rank's own tokens (GPT-2, GPT-Neo),
/// after checking the input: the rank's tokens and positions, the document within the `learned`
/// positions of `model`, ids within the vocabulary. Returns the rank's global positions too.
/// Checks rank `rank`'s input for a model with `learned` absolute positions and a vocabulary of
/// `vocab`: its tokens and positions, the document within the positions, ids within the
/// vocabulary. Returns the rank's global positions.
pub(crate) fn check_learned_positions(model: &str, vocab: usize, learned: usize, rank: usize, plan: &ShardPlan, input: &ShardInput) -> Result<Vec<i64>> {
    let positions = plan.positions(rank);
    let n = positions.len();
    if input.ids.len() != n || input.position_ids.len() != n {
        return Err(ModelError::Input(format!("rank {rank} owns {n} tokens but was given {} ids and {} positions", input.ids.len(), input.position_ids.len())));
    }
    if plan.len() > learned {
        return Err(ModelError::Input(format!("the document has {} tokens; {model} has learned {learned} positions", plan.len())));
    }
    check_vocab(&input.ids, vocab)?;
    if let Some(&bad) = input.position_ids.iter().find(|&&p| p as usize >= learned) {
        return Err(ModelError::Input(format!("position id {bad} is beyond the {learned} learned positions")));
    }
    Ok(positions)
}

pub(crate) fn embed_learned_positions(
    model: &str,
    wte: &Embedding,
    wpe: &Embedding,
    learned: usize,
    group: &dyn Group,
    plan: &ShardPlan,
    input: &ShardInput,
) -> Result<(Tensor, Vec<i64>)> {
    let positions = check_learned_positions(model, wte.embeddings().dim(0)?, learned, group.rank(), plan, input)?;
    let n = positions.len();
    let tok = Tensor::from_slice(&input.ids, n, &Device::Cpu)?;
    let pos = Tensor::from_slice(&input.position_ids, n, &Device::Cpu)?;
    Ok(((wte.forward(&tok)? + wpe.forward(&pos)?)?, positions))
}

#[cfg(test)]
mod f16_range_tests {
    use super::*;

    #[test]
    fn an_f16_run_whose_activations_overflowed_is_refused_saying_so() {
        let cpu = &candle_core::Device::Cpu;
        assert!(check_f16_range(&Tensor::new(&[[1.0f32, -65504.0], [0.5, 3.0]], cpu).unwrap(), 0).is_ok());
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let err = check_f16_range(&Tensor::new(&[[1.0f32, bad], [0.5, 3.0]], cpu).unwrap(), 2).unwrap_err();
            assert!(matches!(&err, ModelError::Input(m) if m.contains("f16 overflowed on rank 2: 1 of its 4 hidden values") && m.contains("bf16 or f32")), "{err}");
        }
    }
}
