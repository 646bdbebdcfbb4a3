//! A Hugging Face model directory: config.json, the weights (model.safetensors, or several
//! files under model.safetensors.index.json), and optionally tokenizer.json and
//! sentence-transformers' `1_Pooling/config.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::model::Model;
use crate::pooling::Pooling;
use crate::registry::ModelConfig;
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

/// `model.safetensors.index.json` of a checkpoint saved in several files.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The checkpoint's safetensors files: `model.safetensors`, else the files that
/// `model.safetensors.index.json` maps tensors to (each a file of the directory itself).
/// PyTorch-only checkpoints are refused with the command that converts them.
fn weight_files(dir: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| format!("cannot read model.safetensors.index.json: {e}"))?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| format!("model.safetensors.index.json: {e}"))?;
        let mut files: Vec<&str> = index.weight_map.values().map(String::as_str).collect();
        files.sort_unstable();
        files.dedup();
        if files.is_empty() {
            return Err("model.safetensors.index.json maps no tensors".into());
        }
        return files
            .into_iter()
            .map(|name| {
                let plain = Path::new(name).file_name().is_some_and(|f| f == name) && name.ends_with(".safetensors");
                if !plain {
                    return Err(format!("model.safetensors.index.json names `{name}`, which is not a .safetensors file of the directory"));
                }
                let file = dir.join(name);
                match file.is_file() {
                    true => Ok(file),
                    false => Err(format!("model.safetensors.index.json names `{name}`, which is missing")),
                }
            })
            .collect();
    }
    if dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file() {
        return Err("holds PyTorch weights (pytorch_model.bin) only; tome reads safetensors. Convert once with transformers: load the checkpoint with \
                    its class (AutoModelForCausalLM for a language model, else AutoModel) and save it with save_pretrained(DIR, safe_serialization=True)"
            .into());
    }
    Err("has no model.safetensors (nor model.safetensors.index.json)".into())
}

impl ModelDir {
    pub fn open(path: &Path) -> Result<Self> {
        let dir_err = |msg: String| ModelError::Directory { dir: path.display().to_string(), msg };
        if !path.is_dir() {
            return Err(dir_err("does not exist or is not a directory".into()));
        }
        let config_path = path.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| dir_err(format!("cannot read config.json: {e}")))?;
        let config = ModelConfig::from_json(&text)?;
        let weights = weight_files(path).map_err(dir_err)?;
        // SAFETY: the files are memory-mapped read-only; tome never writes checkpoints it serves.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, &Device::Cpu) }.map_err(|e| dir_err(format!("the safetensors weights cannot be read: {e}")))?;
        let model = config.load(vb)?;
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
