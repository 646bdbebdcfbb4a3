//! Text to token ids (with character offsets) through the `tokenizers` crate.
//!
//! A checkpoint's tokenizer.json may carry padding and truncation for short-text training
//! (all-MiniLM-L6-v2 pads and truncates to 128); a document processor needs neither, so both
//! are switched off: length limits are the planner's business and are never silent.
//!
//! A document over the server's token limit is refused at about the cost of the limit, never of
//! the document: [`TextTokenizer::encode_at_most`] counts a long text's tokens a piece at a time
//! and stops once the count is past the limit, holding one piece's encoding at a time.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::{ModelError, Result};

pub struct TextTokenizer {
    inner: Tokenizer,
}

/// Bytes of text counted at a time when a document may exceed the token limit.
const COUNT_PIECE_BYTES: usize = 1 << 20;

/// A document's encoding, or the finding that it has more tokens than allowed.
#[derive(Debug)]
pub enum Bounded {
    Encoded(Encoded),
    /// It has at least `tokens` tokens, more than the limit.
    TooLong {
        tokens: usize,
    },
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

    /// Encodes a document of at most `max_tokens` tokens (special tokens included), exactly as
    /// [`TextTokenizer::encode`] does. A text longer in bytes than the limit is first counted a
    /// piece at a time (see [`TextTokenizer::count_past`]); once the count is past the limit it
    /// is refused without being encoded whole.
    pub fn encode_at_most(&self, text: &str, max_tokens: usize) -> Result<Bounded> {
        self.encode_at_most_in_pieces(text, max_tokens, COUNT_PIECE_BYTES)
    }

    fn encode_at_most_in_pieces(&self, text: &str, max_tokens: usize, piece_bytes: usize) -> Result<Bounded> {
        if text.len() > max_tokens {
            let counted = self.count_past(text, max_tokens, piece_bytes)?;
            if counted.tokens > max_tokens.saturating_add(counted.pieces) {
                return Ok(Bounded::TooLong { tokens: counted.tokens - counted.pieces });
            }
        }
        let enc = self.encode(text)?;
        if enc.ids.len() > max_tokens {
            return Ok(Bounded::TooLong { tokens: enc.ids.len() });
        }
        Ok(Bounded::Encoded(enc))
    }

    /// Counts the tokens of `text` (without special tokens) a piece of about `piece_bytes` at a
    /// time, each piece ending before a whitespace character, and stops once the count passes
    /// `limit` plus one token per piece counted (a piece encoded alone may gain a token at its
    /// start, as a SentencePiece word prefix, and never otherwise differs from the whole text's
    /// tokens: no token spans whitespace).
    fn count_past(&self, text: &str, limit: usize, piece_bytes: usize) -> Result<Counted> {
        let mut counted = Counted { tokens: 0, pieces: 0 };
        let mut rest = text;
        while !rest.is_empty() && counted.tokens <= limit.saturating_add(counted.pieces) {
            let end = piece_end(rest, piece_bytes);
            let (piece, tail) = rest.split_at(end);
            counted.tokens += self.inner.encode(piece, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?.len();
            counted.pieces += 1;
            rest = tail;
        }
        Ok(counted)
    }
}

/// Tokens counted over some pieces of a text.
struct Counted {
    tokens: usize,
    pieces: usize,
}

/// Where the piece of `text` that starts it ends: at the first whitespace character at or after
/// `piece_bytes` (the whole text when there is none).
fn piece_end(text: &str, piece_bytes: usize) -> usize {
    if text.len() <= piece_bytes {
        return text.len();
    }
    let mut at = piece_bytes;
    while !text.is_char_boundary(at) {
        at += 1;
    }
    text[at..].find(char::is_whitespace).map_or(text.len(), |i| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer (whitespace words, an unknown-word token) with BERT's special
    /// tokens around every document.
    fn words() -> TextTokenizer {
        let vocab: Vec<String> = ["[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat"].iter().map(|w| format!("\"{w}\"")).enumerate().map(|(i, w)| format!("{w}: {i}")).collect();
        let json = format!(
            r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {{"type": "Whitespace"}},
            "post_processor": {{"type": "BertProcessing", "sep": ["[SEP]", 2], "cls": ["[CLS]", 1]}},
            "decoder": null, "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "[UNK]"}}}}"#,
            vocab.join(", ")
        );
        let path = std::env::temp_dir().join(format!("tome-words-{}.json", std::process::id()));
        std::fs::write(&path, json).unwrap();
        let t = TextTokenizer::from_file(&path).unwrap();
        std::fs::remove_file(path).unwrap();
        t
    }

    #[test]
    fn a_document_within_the_limit_is_encoded_exactly_as_whole() {
        let t = words();
        let text = "the cat sat ".repeat(40);
        let whole = t.encode(&text).unwrap();
        assert_eq!(whole.ids.len(), 122);
        for piece in [7, 64, 1 << 20] {
            let Bounded::Encoded(got) = t.encode_at_most_in_pieces(&text, 122, piece).unwrap() else { panic!("refused at the limit") };
            assert_eq!((got.ids, got.offsets), (whole.ids.clone(), whole.offsets.clone()));
        }
    }

    #[test]
    fn a_longer_one_is_refused_after_counting_about_the_limit() {
        let t = words();
        let text = "the cat sat ".repeat(10_000);
        let Bounded::TooLong { tokens } = t.encode_at_most_in_pieces(&text, 100, 64).unwrap() else { panic!("accepted") };
        assert!((100..200).contains(&tokens), "counting stopped soon past the limit: {tokens}");
        assert!(matches!(t.encode_at_most_in_pieces(&text, 30_001, 64).unwrap(), Bounded::TooLong { tokens: 30_002 }), "one over: found by the exact count");
        assert!(matches!(t.encode_at_most_in_pieces(&text, 30_002, 64).unwrap(), Bounded::Encoded(e) if e.ids.len() == 30_002));
    }

    #[test]
    fn pieces_end_before_whitespace_on_character_boundaries() {
        assert_eq!(piece_end("abc def", 2), 3);
        assert_eq!(piece_end("abc def", 100), 7);
        assert_eq!(piece_end("ééé ab", 1), 6, "never inside a character");
        assert_eq!(piece_end("abcdef", 2), 6, "no whitespace: the whole text");
    }
}
