//! tome-model: checkpoints in Hugging Face format, run sequence-parallel on a Group.
//!
//! A model directory holds `config.json`, `model.safetensors` (memory-mapped) and, optionally,
//! `tokenizer.json` and a sentence-transformers pooling config. Architectures are built from
//! tome-dist operators: a rank runs every layer on its own shard of tokens and the operators
//! move what attention needs between ranks. One rank is a Group of one.

mod activation;
mod bert;
mod config;
mod document;
mod error;
pub mod gpt2;
pub mod gpt_neo;
pub mod gpu;
pub mod heads;
pub mod linear;
pub mod llama;
mod lm_head;
mod model;
mod model_dir;
pub mod modernbert;
pub mod mpnet;
mod pooling;
pub mod reformer;
pub mod registry;
pub mod reversible;
pub mod switch;
mod tokenizer;
pub mod transfo_xl;

pub use bert::BertModel;
pub use config::{BertConfig, EncodeOptions, LayerAttention, NativeAttention, PositionExtension};
pub use document::{Prepared, RunOptions, ShardInput};
pub use error::{ModelError, Result};
pub use model::{Architecture, Model, Shape};
pub use model_dir::ModelDir;
pub use pooling::{l2_normalize, pool_spans, Pooling, MAX_POOL_SPANS};
pub use registry::{ModelConfig, ModelType};
pub use tokenizer::{Bounded, Encoded, TextTokenizer};
