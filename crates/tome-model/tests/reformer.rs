//! Reformer (`reformer-tiny`: transformers 5.24.0's ReformerModel, local and LSH layers
//! alternating, 2 hashing rounds of 4 buckets with the rotations stored in the checkpoint, axial
//! positions, reversible streams) against its golden, on 1..4 ranks.

mod common;

use common::{assert_in_order_match, fixture, fixture_with_config, input_ids};
use tome_model::{EncodeOptions, LayerAttention, ModelDir, NativeAttention};

#[test]
fn reformer_matches_transformers_on_any_number_of_ranks() {
    let dir = ModelDir::open(&fixture("reformer-tiny")).unwrap();
    let doc = dir.model.prepare(input_ids("reformer-tiny"), &EncodeOptions::default()).unwrap();
    assert_eq!(
        doc.layers,
        vec![
            LayerAttention::Native(NativeAttention::Local),
            LayerAttention::Native(NativeAttention::Lsh),
            LayerAttention::Native(NativeAttention::Local),
            LayerAttention::Native(NativeAttention::Lsh)
        ]
    );
    // Both reversible streams come out: twice the model width.
    assert_eq!(dir.model.shape().hidden_size, 64);
    assert_in_order_match("reformer-tiny", "last_hidden_state.npy", &dir, &doc);
}

#[test]
fn documents_between_chunks_are_padded_as_transformers_pads_them() {
    // 60 tokens: 4 padding tokens complete the last chunk on the rank holding the end; they
    // hash to a bucket of their own, are never attended to, and are dropped from the output.
    let dir = ModelDir::open(&fixture("reformer-tiny")).unwrap();
    let doc = dir.model.prepare(input_ids("reformer-tiny")[..60].to_vec(), &EncodeOptions::default()).unwrap();
    assert_in_order_match("reformer-tiny", "last_hidden_state_first60.npy", &dir, &doc);
}

#[test]
fn what_transformers_would_do_differently_is_refused() {
    let dir = ModelDir::open(&fixture("reformer-tiny")).unwrap();
    // One LSH chunk: transformers would switch to full attention.
    let err = dir.model.prepare(input_ids("reformer-tiny")[..8].to_vec(), &EncodeOptions::default()).unwrap_err().to_string();
    assert!(err.contains("one LSH chunk"), "{err}");
    // Beyond the axial positions.
    let long: Vec<u32> = input_ids("reformer-tiny").into_iter().cycle().take(72).collect();
    let err = dir.model.prepare(long, &EncodeOptions::default()).unwrap_err().to_string();
    assert!(err.contains("at most 64 positions"), "{err}");
    for (field, value) in [("is_decoder", serde_json::json!(true)), ("num_buckets", serde_json::json!([2, 2])), ("num_buckets", serde_json::Value::Null)] {
        let path = fixture_with_config("reformer-tiny", field, |c| c[field] = value.clone());
        let err = ModelDir::open(&path).err().unwrap().to_string();
        assert!(err.contains(field), "{field}: {err}");
        std::fs::remove_dir_all(path).unwrap();
    }
    // Rotations of another shape than the config implies name the tensor.
    let path = fixture_with_config("reformer-tiny", "buckets8", |c| c["num_buckets"] = 8.into());
    let err = ModelDir::open(&path).err().unwrap().to_string();
    assert!(err.contains("encoder.layers.1.attention.self_attention.random_rotations"), "{err}");
    std::fs::remove_dir_all(path).unwrap();
}
