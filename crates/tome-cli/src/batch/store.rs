//! A batch's per-document outputs, each written whole or not at all: into a temporary
//! directory, `meta.json` last, synced, then renamed into `documents/<slug>/`. A directory under
//! that name is therefore complete; its `meta.json` says which content it was made from.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::outputs::Collected;

/// What `meta.json` records about a document's outputs.
#[derive(Serialize, Deserialize)]
pub struct Meta {
    pub id: String,
    pub hash: String,
    pub path: Option<String>,
    pub tokens: u64,
    pub chunks: u64,
    pub seconds: f64,
    /// exp(-mean log-prob), when the model is causal and log-probs were asked.
    #[serde(default)]
    pub perplexity: Option<f64>,
    /// The first characters of each chunk's text.
    pub snippets: Vec<String>,
}

/// Characters of a chunk's text kept as its snippet.
pub const SNIPPET_CHARS: usize = 120;

/// A file-system-safe, unique directory name for a document id.
pub fn slug(id: &str) -> String {
    let mut s: String = id.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).take(80).collect();
    let digest = Sha256::digest(id.as_bytes());
    s.push('-');
    s.extend(digest.iter().take(4).map(|b| format!("{b:02x}")));
    s
}

pub fn doc_dir(out: &Path, id: &str) -> PathBuf {
    out.join("documents").join(slug(id))
}

/// The meta of a complete output directory, if there is one.
pub fn read_meta(dir: &Path) -> Option<Meta> {
    serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()
}

/// Snippets of the chunks' text from their character spans.
pub fn snippets(text: &str, char_spans: &[[i64; 2]]) -> Vec<String> {
    let starts: Vec<usize> = text.char_indices().map(|(b, _)| b).chain(std::iter::once(text.len())).collect();
    char_spans
        .iter()
        .map(|&[a, b]| {
            if a < 0 || b <= a {
                return String::new();
            }
            let (a, b) = ((a as usize).min(starts.len() - 1), (b as usize).min(starts.len() - 1));
            let end = b.min(a + SNIPPET_CHARS);
            text[starts[a]..starts[end]].to_string()
        })
        .collect()
}

/// Writes a document's outputs atomically; returns its directory.
pub fn write(out: &Path, collected: &Collected, meta: &Meta) -> anyhow::Result<PathBuf> {
    let docs = out.join("documents");
    std::fs::create_dir_all(&docs)?;
    let dir = doc_dir(out, &meta.id);
    let tmp = docs.join(format!(".tmp-{}-{}", slug(&meta.id), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    collected.write(&tmp)?;
    let mut f = File::create(tmp.join("meta.json"))?;
    f.write_all(&serde_json::to_vec_pretty(meta)?)?;
    f.sync_all()?;
    for entry in std::fs::read_dir(&tmp)? {
        File::open(entry?.path())?.sync_all()?;
    }
    // The directory's entries too, before it takes its final name.
    File::open(&tmp)?.sync_all()?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("moving outputs into {}", dir.display()))?;
    File::open(&docs)?.sync_all()?;
    Ok(dir)
}

/// Removes temporary directories a killed run left behind.
pub fn clean_temporaries(out: &Path) {
    if let Ok(entries) = std::fs::read_dir(out.join("documents")) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_safe_and_distinct() {
        assert_ne!(slug("a/b"), slug("a_b"));
        assert!(slug("books/ünïcode name?.txt").chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)));
    }

    #[test]
    fn snippets_follow_character_spans() {
        let text = "héllo wörld, again";
        assert_eq!(snippets(text, &[[0, 5], [6, 11], [-1, -1], [13, 99]]), vec!["héllo", "wörld", "", "again"]);
    }
}
