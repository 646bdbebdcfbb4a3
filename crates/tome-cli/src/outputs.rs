//! Writing a processed document's outputs: .npy arrays a data person loads directly, and a
//! JSONL summary (one line for the job, one per chunk).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::Context;
use npyz::WriterBuilder;
use serde_json::json;

/// Writes an array of `shape` (row-major) as .npy.
pub fn write_npy<T: npyz::AutoSerialize + Copy>(path: &Path, shape: &[u64], data: &[T]) -> anyhow::Result<()> {
    let file = BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    let mut writer = npyz::WriteOptions::new().default_dtype().shape(shape).writer(file).begin_nd()?;
    writer.extend(data.iter().copied())?;
    writer.finish()?;
    Ok(())
}

pub fn read_ids_npy(path: &Path) -> anyhow::Result<Vec<i64>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).with_context(|| format!("{} is not a .npy file", path.display()))?;
    if npy.shape().len() != 1 {
        anyhow::bail!("{}: token ids must have shape [tokens], got {:?}", path.display(), npy.shape());
    }
    npy.into_vec::<i64>().with_context(|| format!("{}: token ids must be int64", path.display()))
}

/// Everything collected from a Process stream.
#[derive(Default)]
pub struct Collected {
    pub accepted: Option<serde_json::Value>,
    pub done: Option<serde_json::Value>,
    pub width: usize,
    pub document: Option<Vec<f32>>,
    pub chunks: Vec<f32>,
    pub chunk_tokens: Vec<[i64; 2]>,
    pub chunk_chars: Vec<[i64; 2]>,
    pub hidden: Vec<f32>,
    pub hidden_rows: usize,
    /// `[tokens - 1]` (causal models).
    pub log_probs: Vec<f32>,
    /// The layer the hidden states come from, when not the last.
    pub hidden_layer: Option<u32>,
}

impl Collected {
    pub fn write(&self, dir: &Path) -> anyhow::Result<Vec<String>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut written = Vec::new();
        let w = self.width as u64;
        if let Some(doc) = &self.document {
            write_npy(&dir.join("document_embedding.npy"), &[w], doc)?;
            written.push("document_embedding.npy".to_string());
        }
        let n = self.chunk_tokens.len() as u64;
        if n > 0 {
            write_npy(&dir.join("chunk_embeddings.npy"), &[n, w], &self.chunks)?;
            let flat: Vec<i64> = self.chunk_tokens.iter().flatten().copied().collect();
            write_npy(&dir.join("chunk_token_spans.npy"), &[n, 2], &flat)?;
            let flat: Vec<i64> = self.chunk_chars.iter().flatten().copied().collect();
            write_npy(&dir.join("chunk_char_spans.npy"), &[n, 2], &flat)?;
            written.extend(["chunk_embeddings.npy", "chunk_token_spans.npy", "chunk_char_spans.npy"].map(String::from));
        }
        if let Some(width) = self.hidden.len().checked_div(self.hidden_rows) {
            let width = width as u64;
            let name = match self.hidden_layer {
                None => "last_hidden_state.npy".to_string(),
                Some(k) => format!("hidden_states_layer{k}.npy"),
            };
            write_npy(&dir.join(&name), &[self.hidden_rows as u64, width], &self.hidden)?;
            written.push(name);
        }
        if !self.log_probs.is_empty() {
            write_npy(&dir.join("logprobs.npy"), &[self.log_probs.len() as u64], &self.log_probs)?;
            written.push("logprobs.npy".to_string());
        }
        let mut summary = BufWriter::new(File::create(dir.join("summary.jsonl"))?);
        let job = json!({"record": "job", "accepted": self.accepted, "done": self.done, "files": written});
        writeln!(summary, "{job}")?;
        for (i, (t, c)) in self.chunk_tokens.iter().zip(&self.chunk_chars).enumerate() {
            writeln!(summary, "{}", json!({"record": "chunk", "index": i, "tokens": t, "chars": c}))?;
        }
        summary.flush()?;
        written.push("summary.jsonl".to_string());
        Ok(written)
    }
}
