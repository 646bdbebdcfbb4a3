//! Transformer-XL (`transfo-xl-tiny`, transformers 4.37.2's TransfoXLModel run segment by
//! segment from empty memories) and tome's Compressive Transformer (`compressive-tiny`,
//! docs/models/compressive.md, on the same layers) against their goldens from
//! scripts/gen_fixtures_transfo_xl.py, on 1..4 ranks holding whole segments.

mod common;

use common::{assert_in_order_match, fixture, fixture_with_config, input_ids};
use tome_model::{EncodeOptions, LayerAttention, ModelDir, NativeAttention};

fn with_segments(segment_len: usize) -> EncodeOptions {
    EncodeOptions { segment_len: Some(segment_len), ..Default::default() }
}

#[test]
fn transformer_xl_matches_transformers_segment_by_segment() {
    let dir = ModelDir::open(&fixture("transfo-xl-tiny")).unwrap();
    // The adaptive embedding's three clusters, memories carried over 5 segments of 8 ...
    let doc = dir.model.prepare(input_ids("transfo-xl-tiny"), &with_segments(8)).unwrap();
    assert_eq!(doc.layers[0], LayerAttention::Native(NativeAttention::Relative));
    assert_in_order_match("transfo-xl-tiny", "last_hidden_state.npy", &dir, &doc);
    // ... and the output depends on the segment length: 16 + 16 + 8.
    let doc = dir.model.prepare(input_ids("transfo-xl-tiny"), &with_segments(16)).unwrap();
    assert_in_order_match("transfo-xl-tiny", "last_hidden_state_seg16.npy", &dir, &doc);
}

#[test]
fn same_length_sees_the_last_mem_len_keys() {
    // TransfoXLConfig's default and the published checkpoints' setting.
    let path = fixture_with_config("transfo-xl-tiny", "same", |c| c["same_length"] = true.into());
    let dir = ModelDir::open(&path).unwrap();
    let doc = dir.model.prepare(input_ids("transfo-xl-tiny"), &with_segments(8)).unwrap();
    assert_in_order_match("transfo-xl-tiny", "last_hidden_state_same_length.npy", &dir, &doc);
    std::fs::remove_dir_all(path).unwrap();
}

#[test]
fn compressive_memories_match_the_reference_for_every_compression() {
    let ids = input_ids("compressive-tiny");
    let dir = ModelDir::open(&fixture("compressive-tiny")).unwrap();
    let doc = dir.model.prepare(ids.clone(), &with_segments(8)).unwrap();
    assert_eq!(doc.layers[0], LayerAttention::Native(NativeAttention::Compressive));
    assert_in_order_match("compressive-tiny", "last_hidden_state.npy", &dir, &doc);
    for kind in ["mean", "max"] {
        let path = fixture_with_config("compressive-tiny", kind, |c| c["compression"] = kind.into());
        let dir = ModelDir::open(&path).unwrap();
        let doc = dir.model.prepare(ids.clone(), &with_segments(8)).unwrap();
        assert_in_order_match("compressive-tiny", &format!("last_hidden_state_{kind}.npy"), &dir, &doc);
        std::fs::remove_dir_all(path).unwrap();
    }
}

#[test]
fn evictions_that_do_not_compress_evenly_are_refused() {
    // Segments of 3 against memories of 8 evict 3 rows at a time; the rate is 2.
    let dir = ModelDir::open(&fixture("compressive-tiny")).unwrap();
    let doc = dir.model.prepare(input_ids("compressive-tiny"), &with_segments(3)).unwrap();
    let plan = doc.plan(tome_dist::Layout::Contiguous, 1).unwrap();
    let err = tome_dist::run_ranks(1, |g: &tome_dist::InProcessGroup| dir.model.forward_shard(g, &plan, &doc, &mut |_| true)).unwrap_err();
    assert!(err.to_string().contains("multiples of the rate"), "{err}");
}

#[test]
fn configs_outside_the_schema_name_the_field() {
    let bad = fixture_with_config("transfo-xl-tiny", "attn", |c| c["attn_type"] = 2.into());
    let err = ModelDir::open(&bad).err().unwrap().to_string();
    assert!(err.contains("attn_type"), "{err}");
    std::fs::remove_dir_all(bad).unwrap();
    let bad = fixture_with_config("compressive-tiny", "kind", |c| c["compression"] = "median".into());
    let err = ModelDir::open(&bad).err().unwrap().to_string();
    assert!(err.contains("compression") && err.contains("median"), "{err}");
    std::fs::remove_dir_all(bad).unwrap();
    // A tensor of another shape than the config implies is named.
    let bad = fixture_with_config("transfo-xl-tiny", "inner", |c| c["d_inner"] = 40.into());
    let err = ModelDir::open(&bad).err().unwrap().to_string();
    assert!(err.contains("layers.0.pos_ff.CoreNet.0"), "{err}");
    std::fs::remove_dir_all(bad).unwrap();
    // A segment length is only for segment-recurrent models, and only positive.
    let dir = ModelDir::open(&fixture("transfo-xl-tiny")).unwrap();
    assert!(dir.model.prepare(input_ids("transfo-xl-tiny"), &with_segments(0)).is_err());
    let gpt2 = ModelDir::open(&fixture("gpt2-tiny")).unwrap();
    assert!(gpt2.model.prepare(input_ids("gpt2-tiny"), &with_segments(8)).is_err());
}
