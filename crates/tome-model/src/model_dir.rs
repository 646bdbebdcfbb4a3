//! A Hugging Face model directory: config.json, model.safetensors, and optionally tokenizer.json
//! and sentence-transformers' `1_Pooling/config.json`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::pooling::Pooling;
use crate::registry::ModelType;
use crate::tokenizer::TextTokenizer;

/// A loaded model directory.
pub struct ModelDir {
    pub path: PathBuf,
    pub model: Model,
    pub tokenizer: Option<TextTokenizer>,
    /// The pooling the checkpoint was trained with (sentence-transformers config), else mean.
    pub pooling: Pooling,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
}

/// The one field read before the architecture is known.
#[derive(Deserialize)]
struct ModelTypeField {
    #[serde(default)]
    model_type: Option<String>,
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<Self> {
        let dir_err = |msg: String| ModelError::Directory { dir: path.display().to_string(), msg };
        if !path.is_dir() {
            return Err(dir_err("does not exist or is not a directory".into()));
        }
        let config_path = path.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| dir_err(format!("cannot read config.json: {e}")))?;
        let kind: ModelTypeField = serde_json::from_str(&text).map_err(|e| dir_err(format!("config.json is not valid JSON: {e}")))?;
        let model_type = match kind.model_type.as_deref() {
            Some(name) => ModelType::from_name(name)?,
            None => return Err(ModelError::Config { field: "model_type".into(), msg: "missing".into() }),
        };
        let weights = path.join("model.safetensors");
        if !weights.is_file() {
            return Err(dir_err("has no model.safetensors".into()));
        }
        // SAFETY: the file is memory-mapped read-only; tome never writes checkpoints it serves.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &Device::Cpu) }.map_err(|e| dir_err(format!("model.safetensors cannot be read: {e}")))?;
        let model = model_type.load(&text, vb)?;
        let tokenizer_path = path.join("tokenizer.json");
        let tokenizer = tokenizer_path.is_file().then(|| TextTokenizer::from_file(&tokenizer_path)).transpose()?;
        let pooling = match std::fs::read_to_string(path.join("1_Pooling/config.json")) {
            Err(_) => Pooling::Mean,
            Ok(t) => {
                let p: PoolingConfig = serde_json::from_str(&t).map_err(|e| dir_err(format!("1_Pooling/config.json: {e}")))?;
                match (p.pooling_mode_cls_token, p.pooling_mode_mean_tokens) {
                    (true, false) => Pooling::Cls,
                    (false, true) => Pooling::Mean,
                    _ => return Err(dir_err("1_Pooling/config.json must select exactly one of mean or CLS pooling".into())),
                }
            }
        };
        Ok(ModelDir { path: path.to_path_buf(), model, tokenizer, pooling })
    }

    /// The directory's name, used as the model's name.
    pub fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    }
}
