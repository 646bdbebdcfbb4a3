//! Longformer against Hugging Face transformers (fixture `longformer-tiny` from
//! scripts/gen_fixtures.py): per-layer sliding windows (4 and 8 wide) and global attention on
//! three tokens through Longformer's own `query_global` / `key_global` / `value_global`
//! projections, on 1..4 ranks in both layouts (shards shorter than a window included).

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tome_dist::{run_ranks, InProcessGroup, Layout, ShardPlan};
use tome_model::{EncodeOptions, LayerAttention, ModelDir};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/longformer-tiny")
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

#[test]
fn windows_and_global_tokens_match_transformers_on_any_number_of_ranks() {
    let dir = ModelDir::open(&fixture()).unwrap();
    assert_eq!(dir.model.shape().layer_attention, vec!["window:4", "window:8"]);
    let ids: Vec<u32> = read_npy::<i64>(&fixture().join("input_ids.npy")).into_iter().map(|i| i as u32).collect();
    let globals: Vec<usize> = read_npy::<i64>(&fixture().join("global_tokens.npy")).into_iter().map(|i| i as usize).collect();
    let golden = read_npy::<f32>(&fixture().join("last_hidden_state.npy"));
    let opts = EncodeOptions { global_tokens: globals, ..Default::default() };
    let doc = dir.model.prepare(ids.clone(), &opts).unwrap();
    assert_eq!(doc.layers, vec![LayerAttention::Window { one_sided: 2 }, LayerAttention::Window { one_sided: 4 }]);
    for ranks in 1..=4 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let plan = ShardPlan::new(layout, ids.len(), ranks).unwrap();
            let shards: Vec<Tensor> = run_ranks(ranks, |g: &InProcessGroup| dir.model.forward_shard(g, &plan, &doc, &mut |_| true)).unwrap();
            let got: Vec<f32> = plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let d = got.iter().zip(&golden).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d <= 1e-4, "{ranks} ranks {layout:?}: {d}");
        }
    }
    // Without the global projections' effect the outputs differ: the test sees them.
    let plain = dir.model.prepare(ids, &EncodeOptions::default()).unwrap();
    let plan = ShardPlan::new(Layout::Contiguous, plain.len(), 1).unwrap();
    let h = dir.model.forward_shard(&InProcessGroup::single(), &plan, &plain, &mut |_| true).unwrap();
    let got: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
    assert!(got.iter().zip(&golden).any(|(a, b)| (a - b).abs() > 1e-2));
}
