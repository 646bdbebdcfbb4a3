//! The GPT-3-style layer mix (GPT-Neo: dense and causal-window layers alternating) against
//! Hugging Face transformers (fixture from scripts/gen_fixtures.py), loaded as the services load
//! it (its `model_type` through the registry), on 1..4 ranks, both layouts, each rank given only
//! its own tokens.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::gpt_neo::GptNeoConfig;
use tome_model::{EncodeOptions, LayerAttention, ModelDir, ModelType};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt-neo-tiny")
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

fn diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn alternating_dense_and_banded_layers_match_transformers_on_any_number_of_ranks() {
    let cfg: GptNeoConfig = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg.layer_attention().unwrap(),
        vec![LayerAttention::Dense, LayerAttention::Window { one_sided: 4 }, LayerAttention::Dense, LayerAttention::Window { one_sided: 4 }]
    );
    let dir = ModelDir::open(&fixture()).unwrap();
    let model = &dir.model;
    assert_eq!(dir.model.shape().model_type, ModelType::GptNeo.name());
    assert!(model.is_causal());
    let ids: Vec<u32> = read_npy::<i64>(&fixture().join("input_ids.npy")).into_iter().map(|i| i as u32).collect();
    let golden = read_npy::<f32>(&fixture().join("last_hidden_state.npy"));
    let doc = model.prepare(ids.clone(), &EncodeOptions::default()).unwrap();
    assert_eq!(doc.layers, cfg.layer_attention().unwrap());
    let run = |ranks: usize, layout: Layout| -> Vec<f32> {
        let plan = ShardPlan::new(layout, ids.len(), ranks).unwrap();
        let shards = run_ranks(ranks, |g: &InProcessGroup| {
            let input = doc.shard(&plan, g.rank());
            assert_eq!(input.ids.len(), plan.positions(g.rank()).len(), "a rank receives its own tokens only");
            model.forward(g, &plan, &input, &mut |_| true)
        })
        .unwrap();
        plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let one = run(1, Layout::Contiguous);
    assert!(diff(&one, &golden) <= 1e-4, "1 rank vs transformers: {}", diff(&one, &golden));
    for ranks in 2..=4 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let many = run(ranks, layout);
            assert!(diff(&many, &one) <= 1e-5, "{ranks} ranks {layout:?}: {}", diff(&many, &one));
            assert!(diff(&many, &golden) <= 1e-4);
        }
    }
    // Beyond the learned positions is refused, and so is an attention override.
    let err = model.prepare(vec![1; 65], &EncodeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("learned 64 positions"), "{err}");
    let dense = EncodeOptions { attention: Some(LayerAttention::Dense), ..Default::default() };
    assert!(model.prepare(ids.clone(), &dense).unwrap_err().to_string().contains("would change its outputs"));
}

/// `GPTNeoForCausalLM`'s logits are the last hidden state times the tied `wte`: log-probs from
/// transformers' hidden states and the checkpoint's `wte`, in f64, against tome's.
#[test]
fn log_probs_use_the_tied_embeddings_as_transformers_head_does() {
    let dir = ModelDir::open(&fixture()).unwrap();
    let ids: Vec<u32> = read_npy::<i64>(&fixture().join("input_ids.npy")).into_iter().map(|i| i as u32).collect();
    let golden = read_npy::<f32>(&fixture().join("last_hidden_state.npy"));
    let tensors = candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap();
    let wte: Vec<Vec<f32>> = tensors["wte.weight"].to_vec2().unwrap();
    let d = wte[0].len();
    let want: Vec<f32> = (0..ids.len() - 1)
        .map(|t| {
            let h = &golden[t * d..(t + 1) * d];
            let logits: Vec<f64> = wte.iter().map(|w| w.iter().zip(h).map(|(&a, &b)| a as f64 * b as f64).sum()).collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
            (logits[ids[t + 1] as usize] - lse) as f32
        })
        .collect();
    let hidden = Tensor::from_slice(&golden, (ids.len(), d), &Device::Cpu).unwrap();
    let got: Vec<f32> = dir.model.log_probs(&hidden, &ids[1..]).unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap();
    assert!(diff(&got, &want) <= 1e-4, "{}", diff(&got, &want));
}
