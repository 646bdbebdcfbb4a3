//! Serde mirrors of Hugging Face `config.json` for the BERT family, and the per-request options
//! that choose attention and position handling.

use serde::Deserialize;
use tome_attn::Precision;

use crate::error::{ModelError, Result};
use crate::registry::ModelType;

/// `config.json` of `BertModel` / `RobertaModel` (and sentence-transformers' copies of them).
#[derive(Clone, Debug, Deserialize)]
pub struct BertConfig {
    #[serde(default = "default_model_type")]
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default)]
    pub position_embedding_type: PositionEmbeddingType,
    /// Longformer-style window size (both sides together), one for all layers or one per layer.
    /// Absent: dense attention.
    #[serde(default)]
    pub attention_window: Option<OneOrPerLayer>,
    /// BigBird's attention (block-sparse when absent).
    #[serde(default)]
    pub attention_type: Option<BigBirdAttention>,
    #[serde(default)]
    pub block_size: Option<usize>,
    #[serde(default)]
    pub num_random_blocks: Option<usize>,
    /// BigBird: word embeddings scaled by sqrt(hidden_size).
    #[serde(default)]
    pub rescale_embeddings: bool,
    /// BigBird: biases on the query/key/value projections.
    #[serde(default = "default_true")]
    pub use_bias: bool,
    /// tome's Performer encoder: random features per head (FAVOR+).
    #[serde(default)]
    pub nb_features: Option<usize>,
    /// tome's Performer encoder: causal FAVOR+ (prefix sums) instead of bidirectional.
    #[serde(default)]
    pub causal: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrPerLayer {
    One(usize),
    PerLayer(Vec<usize>),
}

/// `model_type` of tome's own Performer encoder (no Hugging Face class exists): a BERT encoder
/// whose attention is FAVOR+; see docs/models/performer.md for the schema.
pub const PERFORMER: &str = "tome-performer";

/// How a BERT-family encoder numbers positions; only learned absolute positions are
/// implemented (transformers' `relative_key` variants are refused when the config is read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionEmbeddingType {
    #[default]
    Absolute,
}

/// BigBird's `attention_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BigBirdAttention {
    BlockSparse,
    OriginalFull,
}

fn default_model_type() -> ModelType {
    ModelType::Bert
}
fn default_act() -> Activation {
    Activation::GeluErf
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_true() -> bool {
    true
}

fn config_err(field: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config { field: field.into(), msg: msg.into() }
}

impl BertConfig {
    pub fn validate(&self) -> Result<()> {
        if !self.model_type.is_bert_family() {
            let family: Vec<&str> = ModelType::ALL.iter().filter(|t| t.is_bert_family()).map(|t| t.name()).collect();
            return Err(config_err("model_type", format!("`{}` is not a BERT-family encoder ({})", self.model_type.name(), family.join(", "))));
        }
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(config_err("num_attention_heads", format!("{} heads do not divide hidden_size {}", self.num_attention_heads, self.hidden_size)));
        }
        self.layer_attention()?;
        if self.max_position_embeddings <= self.position_offset() {
            return Err(config_err("max_position_embeddings", "leaves no usable position"));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// RoBERTa-style models number positions from `pad_token_id + 1`; BERT, BigBird and the
    /// Performer encoder from 0.
    pub fn position_offset(&self) -> usize {
        if matches!(self.model_type, ModelType::Bert | ModelType::BigBird | ModelType::Performer) {
            0
        } else {
            self.pad_token_id + 1
        }
    }

    /// Positions a token sequence can use without extension.
    pub fn usable_positions(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }

    /// The attention each layer's config selects.
    pub fn layer_attention(&self) -> Result<Vec<LayerAttention>> {
        let n = self.num_hidden_layers;
        if self.model_type == ModelType::Performer {
            let features = self.nb_features.filter(|&m| m > 0).ok_or_else(|| config_err("nb_features", "a positive number of random features is required"))?;
            return Ok(vec![LayerAttention::Favor { features, causal: self.causal }; n]);
        }
        if self.model_type == ModelType::BigBird {
            return match self.attention_type.unwrap_or(BigBirdAttention::BlockSparse) {
                BigBirdAttention::OriginalFull => Ok(vec![LayerAttention::Dense; n]),
                BigBirdAttention::BlockSparse => {
                    let block = self.block_size.unwrap_or(64);
                    if block == 0 {
                        return Err(config_err("block_size", "must be positive"));
                    }
                    Ok(vec![LayerAttention::BlockSparse { block, random: self.num_random_blocks.unwrap_or(3) }; n])
                }
            };
        }
        let windows = match &self.attention_window {
            None => return Ok(vec![LayerAttention::Dense; n]),
            Some(OneOrPerLayer::One(w)) => vec![*w; n],
            Some(OneOrPerLayer::PerLayer(ws)) if ws.len() == n => ws.clone(),
            Some(OneOrPerLayer::PerLayer(ws)) => {
                return Err(config_err("attention_window", format!("{} entries for {n} layers", ws.len())));
            }
        };
        windows.into_iter().map(LayerAttention::window).collect()
    }
}

/// A feed-forward activation, by its transformers name (a key of `ACT2FN`); a name tome does
/// not implement is refused when the config is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// `gelu`: x·Φ(x) with the exact error function.
    #[serde(rename = "gelu")]
    GeluErf,
    /// `gelu_new` and its equals `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    /// `silu` (`swish`): x·σ(x).
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

/// The attention a layer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerAttention {
    Dense,
    /// Each token sees `one_sided` tokens on either side (Longformer's `attention_window / 2`).
    Window {
        one_sided: usize,
    },
    /// BigBird block-sparse attention: `block`-token blocks, each query block seeing the global
    /// first and last blocks, three sliding blocks and `random` random blocks — the plan of
    /// transformers in eval mode, where every random block is block 0.
    BlockSparse {
        block: usize,
        random: usize,
    },
    /// FAVOR+ linear attention (Performer) with `features` random features per head, its
    /// projection read from the checkpoint.
    Favor {
        features: usize,
        causal: bool,
    },
    /// The attention the architecture itself defines and no option overrides.
    Native(NativeAttention),
}

/// Attentions an architecture defines itself and no option overrides. These keep tokens in
/// order across ranks, so documents that use them run the contiguous layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NativeAttention {
    /// Reformer's LSH layers.
    Lsh,
    /// Reformer's chunked local layers.
    Local,
    /// Transformer-XL's relative attention over segment memories.
    Relative,
    /// The Compressive Transformer's memories and compressed memories.
    Compressive,
    /// Switch Transformers' dense attention with T5's relative position bias.
    RelativeBias,
}

impl NativeAttention {
    pub const ALL: [NativeAttention; 5] = [Self::Lsh, Self::Local, Self::Relative, Self::Compressive, Self::RelativeBias];

    /// The name it has on the wire and in descriptions.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lsh => "lsh",
            Self::Local => "local",
            Self::Relative => "relative",
            Self::Compressive => "compressive",
            Self::RelativeBias => "relative-bias",
        }
    }

    /// The attention named `name`, if tome has one by that name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    /// Every name, for error messages.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

impl LayerAttention {
    /// From a Longformer `attention_window` (even, both sides together).
    pub fn window(attention_window: usize) -> Result<Self> {
        if attention_window == 0 || !attention_window.is_multiple_of(2) {
            return Err(config_err("attention_window", format!("{attention_window} must be even and positive")));
        }
        Ok(LayerAttention::Window { one_sided: attention_window / 2 })
    }
}

impl std::fmt::Display for LayerAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerAttention::Dense => write!(f, "dense"),
            LayerAttention::Window { one_sided } => write!(f, "window:{}", one_sided * 2),
            LayerAttention::BlockSparse { block, random } => write!(f, "block_sparse:{block}:{random}"),
            LayerAttention::Favor { features, causal } => write!(f, "favor:{features}{}", if *causal { ":causal" } else { "" }),
            LayerAttention::Native(native) => write!(f, "{}", native.name()),
        }
    }
}

/// What a refusal of a document longer than the learned positions tells the caller to do, in
/// the API's words and the command line's.
pub const ASK_FOR_TILED_POSITIONS: &str =
    "ask for tiled positions (API: options.position_extension = POSITION_EXTENSION_TILE; command line: --positions tile) or send a shorter document";

/// Documents longer than the learned positions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PositionExtension {
    /// Refuse them.
    #[default]
    Refuse,
    /// Token p uses learned position `p mod usable_positions` (Longformer initialises its long
    /// positions by copying the short ones this way).
    Tile,
}

/// How one document is encoded, beyond the model's config.
#[derive(Clone, Debug, Default)]
pub struct EncodeOptions {
    /// Overrides every layer's attention.
    pub attention: Option<LayerAttention>,
    pub position_extension: PositionExtension,
    /// Token positions with global attention (window layers only), ascending.
    pub global_tokens: Vec<usize>,
    /// Which layer's hidden states to return: `None` for the last.
    pub output_layer: Option<usize>,
    /// Tokens per segment for segment-recurrent models; `None` for the model's default.
    pub segment_len: Option<usize>,
    /// The arithmetic to run in; the architecture must list it in
    /// [`Architecture::precisions`](crate::model::Architecture::precisions).
    pub precision: Precision,
}
