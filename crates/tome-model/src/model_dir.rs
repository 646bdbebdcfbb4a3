//! A Hugging Face model directory: config.json, the weights (model.safetensors, or several
//! files under model.safetensors.index.json), and optionally tokenizer.json and
//! sentence-transformers' pooling: the Pooling module `modules.json` lists (else `1_Pooling`),
//! its `config.json` in either the legacy flag form (`pooling_mode_cls_token`, ...) or
//! sentence-transformers 6's `pooling_mode`.

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
    /// sentence-transformers' `modules.json` ends its pipeline with `Normalize`: the
    /// checkpoint's embeddings are meant L2-normalised (requests choose whether to normalise).
    pub normalize: bool,
}

/// A Pooling module's `config.json`: the legacy flags (one of CLS and mean set, the others
/// unset or false) or sentence-transformers 6's `pooling_mode`.
#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
    #[serde(default)]
    pooling_mode: Option<PoolingMode>,
}

/// The `pooling_mode` values tome pools with (sentence-transformers also knows max,
/// mean_sqrt_len_tokens, weightedmean and lasttoken, and tuples of modes: refused).
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum PoolingMode {
    Cls,
    Mean,
}

impl PoolingConfig {
    fn pooling(&self) -> std::result::Result<Pooling, String> {
        let others = self.pooling_mode_max_tokens || self.pooling_mode_mean_sqrt_len_tokens || self.pooling_mode_weightedmean_tokens || self.pooling_mode_lasttoken;
        match (&self.pooling_mode, self.pooling_mode_cls_token, self.pooling_mode_mean_tokens, others) {
            (Some(PoolingMode::Cls), false, false, false) | (None, true, false, false) => Ok(Pooling::Cls),
            (Some(PoolingMode::Mean), false, false, false) | (None, false, true, false) => Ok(Pooling::Mean),
            _ => Err("must select exactly one of mean or CLS pooling (tome pools with no other mode)".into()),
        }
    }
}

/// One entry of sentence-transformers' `modules.json`.
#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
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
        // sentence-transformers' pipeline: where its Pooling module lives, and whether it ends
        // in Normalize. Without modules.json, `1_Pooling` as sentence-transformers saves it.
        let modules: Vec<ModuleEntry> = match std::fs::read_to_string(path.join("modules.json")) {
            Err(_) => Vec::new(),
            Ok(t) => serde_json::from_str(&t).map_err(|e| dir_err(format!("modules.json: {e}")))?,
        };
        let module = |name: &str| modules.iter().find(|m| m.kind.rsplit('.').next() == Some(name));
        let pooling_dir = match module("Pooling") {
            Some(m) => m.path.clone(),
            None => "1_Pooling".into(),
        };
        if pooling_dir.is_empty() || Path::new(&pooling_dir).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(dir_err(format!("modules.json puts the Pooling module at `{pooling_dir}`, which is not a folder of the directory")));
        }
        let pooling_config = Path::new(&pooling_dir).join("config.json");
        let pooling = match std::fs::read_to_string(path.join(&pooling_config)) {
            Err(_) => Pooling::Mean,
            Ok(t) => {
                let p: PoolingConfig = serde_json::from_str(&t).map_err(|e| dir_err(format!("{}: {e}", pooling_config.display())))?;
                p.pooling().map_err(|e| dir_err(format!("{} {e}", pooling_config.display())))?
            }
        };
        let normalize = modules.last().is_some_and(|m| m.kind.rsplit('.').next() == Some("Normalize"));
        Ok(ModelDir { path: path.to_path_buf(), model, tokenizer, pooling, normalize })
    }

    /// The directory's name, used as the model's name.
    pub fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into())
    }
}
