//! The GPT-3-style layer mix (GPT-Neo: dense and causal-window layers alternating) against
//! Hugging Face transformers (fixture from scripts/gen_fixtures.py), on 1..4 ranks, both layouts.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use tome_dist::{run_ranks, InProcessGroup, Layout, ShardPlan};
use tome_model::gpt_neo::{GptNeoConfig, GptNeoModel};
use tome_model::LayerAttention;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt-neo-tiny")
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

#[test]
fn alternating_dense_and_banded_layers_match_transformers_on_any_number_of_ranks() {
    let cfg: GptNeoConfig = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg.layer_attention().unwrap(),
        vec![LayerAttention::Dense, LayerAttention::Window { one_sided: 4 }, LayerAttention::Dense, LayerAttention::Window { one_sided: 4 }]
    );
    // SAFETY: the fixture file is only read.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[fixture().join("model.safetensors")], DType::F32, &Device::Cpu).unwrap() };
    let model = GptNeoModel::load(vb, &cfg).unwrap();
    let ids: Vec<u32> = read_npy::<i64>(&fixture().join("input_ids.npy")).into_iter().map(|i| i as u32).collect();
    let golden = read_npy::<f32>(&fixture().join("last_hidden_state.npy"));
    let run = |ranks: usize, layout: Layout| -> Vec<f32> {
        let plan = ShardPlan::new(layout, ids.len(), ranks).unwrap();
        let shards = run_ranks(ranks, |g: &InProcessGroup| model.forward_shard(g, &plan, &ids)).unwrap();
        plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let one = run(1, Layout::Contiguous);
    assert!(diff(&one, &golden) <= 1e-4, "1 rank vs transformers: {}", diff(&one, &golden));
    for ranks in 2..=4 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let many = run(ranks, layout);
            assert!(diff(&many, &one) <= 1e-5, "{ranks} ranks {layout:?}: {}", diff(&many, &one));
            assert!(diff(&many, &golden) <= 1e-4);
        }
    }
    // Beyond the learned positions is refused.
    let long: Vec<u32> = vec![1; 65];
    let plan = ShardPlan::new(Layout::Contiguous, 65, 1).unwrap();
    let err = model.forward_shard(&InProcessGroup::single(), &plan, &long).unwrap_err();
    assert!(err.to_string().contains("learned 64 positions"), "{err}");
}
