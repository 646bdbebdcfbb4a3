//! What a batch processes: the documents of a directory (recursively), of a glob, or of a JSONL
//! manifest (one `{"id", "path" | "text", "options"}` object per line, paths relative to the
//! manifest). A manifest line that cannot be read becomes a document that fails with the
//! reason, so one bad line never stops a batch.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Where a document's text comes from.
#[derive(Clone, Debug)]
pub enum Source {
    File(PathBuf),
    Text(String),
    /// A manifest line that could not be read: the document fails with this reason.
    Broken(String),
}

#[derive(Clone, Debug)]
pub struct DocInput {
    pub id: String,
    pub source: Source,
    /// Per-document options (manifest only), checked when the document runs.
    pub options: serde_json::Value,
}

impl DocInput {
    /// The document's bytes (read now; a file may have changed since the batch began).
    pub fn bytes(&self) -> anyhow::Result<Vec<u8>> {
        match &self.source {
            Source::File(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display())),
            Source::Text(t) => Ok(t.clone().into_bytes()),
            Source::Broken(why) => bail!("{why}"),
        }
    }

    /// Tokens the document will have, guessed from its size (about 4 bytes a token in
    /// English prose) before the server counts them.
    pub fn estimated_tokens(&self) -> u64 {
        let bytes = match &self.source {
            Source::File(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
            Source::Text(t) => t.len() as u64,
            Source::Broken(_) => 0,
        };
        (bytes / 4).max(1)
    }

    pub fn path(&self) -> Option<&Path> {
        match &self.source {
            Source::File(p) => Some(p),
            _ => None,
        }
    }
}

/// A document's identity for resuming: its content, its options and the batch's settings.
pub fn content_hash(bytes: &[u8], options: &serde_json::Value, settings: &str) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.update(options.to_string().as_bytes());
    h.update(settings.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestLine {
    id: String,
    path: Option<PathBuf>,
    text: Option<String>,
    #[serde(default)]
    options: serde_json::Value,
}

/// The documents `input` names, in a stable order; ids are unique.
pub fn documents(input: &str) -> anyhow::Result<Vec<DocInput>> {
    let path = Path::new(input);
    let docs = if path.is_dir() {
        let mut files = Vec::new();
        walk(path, &mut files)?;
        files.sort();
        files.into_iter().map(|f| DocInput { id: relative_id(path, &f), source: Source::File(f), options: serde_json::Value::Null }).collect()
    } else if path.is_file() && path.extension().is_some_and(|e| e == "jsonl") {
        manifest(path)?
    } else {
        let mut files: Vec<PathBuf> =
            glob::glob(input).with_context(|| format!("{input} is not a directory, a .jsonl manifest or a valid glob"))?.filter_map(Result::ok).filter(|p| p.is_file()).collect();
        files.sort();
        if files.is_empty() {
            bail!("{input} names no documents (a directory, a .jsonl manifest or a glob)");
        }
        files.into_iter().map(|f| DocInput { id: f.to_string_lossy().into_owned(), source: Source::File(f), options: serde_json::Value::Null }).collect()
    };
    let mut seen = std::collections::HashSet::new();
    for d in &docs {
        if !seen.insert(d.id.clone()) {
            bail!("document id {:?} appears twice", d.id);
        }
    }
    Ok(docs)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

fn relative_id(root: &Path, file: &Path) -> String {
    file.strip_prefix(root).unwrap_or(file).to_string_lossy().into_owned()
}

fn manifest(path: &Path) -> anyhow::Result<Vec<DocInput>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let line_id = format!("{}:{}", path.display(), i + 1);
        let doc = match serde_json::from_str::<ManifestLine>(line) {
            Err(e) => DocInput { id: line_id, source: Source::Broken(format!("manifest line {}: {e}", i + 1)), options: serde_json::Value::Null },
            Ok(m) => {
                let source = match (m.path, m.text) {
                    (Some(p), None) => Source::File(base.join(p)),
                    (None, Some(t)) => Source::Text(t),
                    _ => Source::Broken(format!("manifest line {}: give exactly one of \"path\" and \"text\"", i + 1)),
                };
                DocInput { id: m.id, source, options: m.options }
            }
        };
        docs.push(doc);
    }
    Ok(docs)
}
