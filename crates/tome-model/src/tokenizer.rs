//! Text to token ids (with character offsets) through the `tokenizers` crate.
//!
//! A checkpoint's tokenizer.json may carry padding and truncation for short-text training
//! (all-MiniLM-L6-v2 pads and truncates to 128); a document processor needs neither, so both
//! are switched off: length limits are the planner's business and are never silent.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};

pub struct TextTokenizer {
    inner: Tokenizer,
}

/// Token ids of a text, with each token's character (Unicode scalar) offsets.
#[derive(Clone, Debug, Default)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub offsets: Vec<(usize, usize)>,
}

impl TextTokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(TextTokenizer { inner })
    }

    /// Encodes a whole document, special tokens included.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let enc = self.inner.encode_char_offsets(text, true).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(Encoded { ids: enc.get_ids().to_vec(), offsets: enc.get_offsets().to_vec() })
    }
}
