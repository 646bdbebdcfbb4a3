//! The batch journal (`journal.jsonl` in the output directory): one line per document that
//! ended, appended and synced to disk before the batch moves on, so a batch killed at any
//! moment knows on its next run which documents are done. A line cut short by the kill is
//! ignored.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Done,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    /// The content hash the entry is about (a changed document is redone).
    pub hash: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub attempts: u32,
    pub seconds: f64,
    /// The outputs were found complete on disk, written by a run killed before its journal line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

pub struct Journal {
    file: File,
    latest: HashMap<String, Entry>,
}

impl Journal {
    /// Opens (or creates) the journal and reads what earlier runs recorded.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut latest = HashMap::new();
        if let Ok(bytes) = std::fs::read(path) {
            // Bytes, not text: a kill may cut a line inside a character.
            for line in bytes.split(|&b| b == b'\n') {
                // A line cut short by a kill does not parse: that document simply is not done.
                if let Ok(e) = serde_json::from_slice::<Entry>(line) {
                    latest.insert(e.id.clone(), e);
                }
            }
            // Drop a partial last line so the next entry starts on a line of its own.
            if bytes.last().is_some_and(|&b| b != b'\n') {
                let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                let f = OpenOptions::new().write(true).open(path)?;
                f.set_len(keep as u64)?;
                f.sync_all()?;
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Journal { file, latest })
    }

    /// The last entry for `id` from any run.
    pub fn latest(&self, id: &str) -> Option<&Entry> {
        self.latest.get(id)
    }

    /// Appends an entry and syncs it to disk.
    pub fn record(&mut self, entry: Entry) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(&entry)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.sync_data()?;
        self.latest.insert(entry.id.clone(), entry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry { id: id.into(), hash: "h".into(), status: Status::Done, tokens: Some(3), chunks: None, reason: None, attempts: 1, seconds: 0.5, recovered: false }
    }

    #[test]
    fn a_line_cut_anywhere_is_dropped_and_the_rest_kept() {
        let dir = std::env::temp_dir().join(format!("tome-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut j = Journal::open(&path).unwrap();
        j.record(entry("a")).unwrap();
        j.record(Entry { id: "bé".into(), ..entry("x") }).unwrap();
        drop(j);
        // Cut the last line inside its two-byte character, as a kill might.
        let bytes = std::fs::read(&path).unwrap();
        let cut = bytes.len() - bytes.iter().rev().position(|&b| b == 0xc3).unwrap();
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let mut j = Journal::open(&path).unwrap();
        assert!(j.latest("a").is_some());
        assert!(j.latest("bé").is_none());
        j.record(entry("c")).unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert!(j.latest("a").is_some() && j.latest("c").is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
