//! BigBird against Hugging Face transformers (fixture `big-bird-tiny` from
//! scripts/gen_fixtures.py): block-sparse attention (blocks of 4, one random block, transformers'
//! eval-mode plan) on 1..4 ranks in both layouts; short documents fall back to full attention
//! as transformers does; lengths that are not whole blocks are padded as transformers pads them.

mod common;

use common::{assert_golden_match, assert_hidden_states_match, fixture, input_ids};
use tome_model::{EncodeOptions, LayerAttention, ModelDir};

#[test]
fn block_sparse_attention_matches_transformers_on_any_number_of_ranks() {
    let dir = ModelDir::open(&fixture("big-bird-tiny")).unwrap();
    let ids = input_ids("big-bird-tiny");
    let doc = dir.model.prepare(ids.clone(), &EncodeOptions::default()).unwrap();
    assert_eq!(doc.layers[0], LayerAttention::BlockSparse { block: 4, random: 1 });
    assert_hidden_states_match("big-bird-tiny", &dir, &doc);
    // At most (5 + 2 r) blocks: full attention, as transformers switches to it.
    let short = dir.model.prepare(ids[..28].to_vec(), &EncodeOptions::default()).unwrap();
    assert!(short.layers.iter().all(|l| *l == LayerAttention::Dense));
}

#[test]
fn partial_blocks_are_padded_as_transformers_pads_them() {
    // 46 tokens: two padding tokens complete the last (global) block on the rank holding the
    // document's end; they are never attended to and their rows are dropped.
    let dir = ModelDir::open(&fixture("big-bird-tiny")).unwrap();
    let doc = dir.model.prepare(input_ids("big-bird-tiny")[..46].to_vec(), &EncodeOptions::default()).unwrap();
    assert_eq!(doc.layers[0], LayerAttention::BlockSparse { block: 4, random: 1 });
    assert_golden_match("big-bird-tiny", "last_hidden_state_first46.npy", &dir, &doc);
}
