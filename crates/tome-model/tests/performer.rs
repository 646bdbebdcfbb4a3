//! tome's Performer encoder (own schema, docs/models/performer.md) against its reference: BERT
//! layers with performer-pytorch's FastAttention (FAVOR+) computed in PyTorch (fixture
//! `performer-tiny` from scripts/gen_fixtures.py), with the projections read from the
//! checkpoint, on 1..4 ranks in both layouts.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tome_dist::{run_ranks, InProcessGroup, Layout, ShardPlan};
use tome_model::{EncodeOptions, LayerAttention, ModelDir};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/performer-tiny")
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

#[test]
fn favor_layers_match_performer_pytorch_on_any_number_of_ranks() {
    let dir = ModelDir::open(&fixture()).unwrap();
    let ids: Vec<u32> = read_npy::<i64>(&fixture().join("input_ids.npy")).into_iter().map(|i| i as u32).collect();
    let golden = read_npy::<f32>(&fixture().join("last_hidden_state.npy"));
    let doc = dir.model.prepare(ids.clone(), &EncodeOptions::default()).unwrap();
    assert_eq!(doc.layers[0], LayerAttention::Favor { features: 16, causal: false });
    assert_eq!(dir.model.shape().layer_attention[0], "favor:16");
    for ranks in 1..=4 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let plan = ShardPlan::new(layout, ids.len(), ranks).unwrap();
            let shards: Vec<Tensor> = run_ranks(ranks, |g: &InProcessGroup| dir.model.forward_shard(g, &plan, &doc, &mut |_| true)).unwrap();
            let got: Vec<f32> = plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let d = got.iter().zip(&golden).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d <= 1e-4, "{ranks} ranks {layout:?}: {d}");
        }
    }
}
