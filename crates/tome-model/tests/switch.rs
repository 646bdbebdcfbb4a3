//! Switch Transformers encoder (`switch-tiny`: transformers 5.24.0's
//! SwitchTransformersEncoderModel, a dense and a sparse layer of 4 experts whose capacity of 12
//! drops tokens) against its golden, on 1..4 ranks: expert capacity is decided in global token
//! order whichever rank holds a token.

mod common;

use common::{assert_in_order_match, fixture, fixture_with_config, input_ids, read_npy};
use tome_model::{EncodeOptions, LayerAttention, ModelDir, NativeAttention};

#[test]
fn switch_encoder_matches_transformers_on_any_number_of_ranks() {
    let dir = ModelDir::open(&fixture("switch-tiny")).unwrap();
    let doc = dir.model.prepare(input_ids("switch-tiny"), &EncodeOptions::default()).unwrap();
    assert_eq!(doc.layers, vec![LayerAttention::Native(NativeAttention::RelativeBias); 2]);
    assert_eq!(dir.model.shape().layer_attention, vec!["relative-bias".to_string(), "relative-bias + 4 experts".to_string()]);
    // The fixture drops tokens: the golden checks what a dropped token gets.
    let kept = read_npy::<bool>(&fixture("switch-tiny").join("kept.npy"));
    assert_eq!(kept.iter().filter(|k| !**k).count(), 10, "the fixture overflows two experts");
    assert_in_order_match("switch-tiny", "last_hidden_state.npy", &dir, &doc);
}

#[test]
fn capacity_changes_the_output_and_bad_configs_name_the_field() {
    // A capacity nobody reaches keeps every token: the output differs from the golden's.
    let path = fixture_with_config("switch-tiny", "cap", |c| c["expert_capacity"] = 48.into());
    let roomy = ModelDir::open(&path).unwrap();
    let doc = roomy.model.prepare(input_ids("switch-tiny"), &EncodeOptions::default()).unwrap();
    let plan = doc.plan(tome_dist::Layout::Contiguous, 1).unwrap();
    let out = tome_dist::run_ranks(1, |g: &tome_dist::InProcessGroup| roomy.model.forward_shard(g, &plan, &doc, &mut |_| true)).unwrap();
    let got: Vec<f32> = out[0].flatten_all().unwrap().to_vec1().unwrap();
    let golden = read_npy::<f32>(&fixture("switch-tiny").join("last_hidden_state.npy"));
    assert!(common::max_diff(&got, &golden) > 1e-3);
    std::fs::remove_dir_all(path).unwrap();
    let path = fixture_with_config("switch-tiny", "act", |c| c["dense_act_fn"] = "quick_gelu".into());
    let err = ModelDir::open(&path).err().unwrap().to_string();
    assert!(err.contains("dense_act_fn") && err.contains("quick_gelu"), "{err}");
    std::fs::remove_dir_all(path).unwrap();
}
