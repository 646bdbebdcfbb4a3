//! Longformer against Hugging Face transformers (fixture `longformer-tiny` from
//! scripts/gen_fixtures.py): per-layer sliding windows (4 and 8 wide) and global attention on
//! three tokens through Longformer's own `query_global` / `key_global` / `value_global`
//! projections, on 1..4 ranks in both layouts (shards shorter than a window included).

mod common;

use common::{assert_hidden_states_match, fixture, input_ids, read_npy};
use tome_dist::{InProcessGroup, Layout, ShardPlan};
use tome_model::{EncodeOptions, LayerAttention, ModelDir};

#[test]
fn windows_and_global_tokens_match_transformers_on_any_number_of_ranks() {
    let name = "longformer-tiny";
    let dir = ModelDir::open(&fixture(name)).unwrap();
    assert_eq!(dir.model.shape().layer_attention, vec!["window:4", "window:8"]);
    let ids = input_ids(name);
    let globals: Vec<usize> = read_npy::<i64>(&fixture(name).join("global_tokens.npy")).into_iter().map(|i| i as usize).collect();
    let golden = read_npy::<f32>(&fixture(name).join("last_hidden_state.npy"));
    let doc = dir.model.prepare(ids.clone(), &EncodeOptions { global_tokens: globals, ..Default::default() }).unwrap();
    assert_eq!(doc.layers, vec![LayerAttention::Window { one_sided: 2 }, LayerAttention::Window { one_sided: 4 }]);
    assert_hidden_states_match(name, &dir, &doc);
    // Without the global projections' effect the outputs differ: the test sees them.
    let plain = dir.model.prepare(ids, &EncodeOptions::default()).unwrap();
    let plan = ShardPlan::new(Layout::Contiguous, plain.len(), 1).unwrap();
    let h = dir.model.forward_shard(&InProcessGroup::single(), &plan, &plain, &mut |_| true).unwrap();
    let got: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
    assert!(got.iter().zip(&golden).any(|(a, b)| (a - b).abs() > 1e-2));
}
