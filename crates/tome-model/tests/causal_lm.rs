//! Causal language models against Hugging Face transformers (fixtures from
//! scripts/gen_fixtures.py): GPT-2 (with `scale_attn_by_inverse_layer_idx`, tied head) and
//! Llama (RoPE, grouped-query attention, RMSNorm, SwiGLU, untied head), loaded through
//! `ModelDir`: hidden states and per-token log-probabilities on 1..4 ranks in both layouts, each
//! rank scoring its own tokens.

mod common;

use candle_core::Tensor;
use common::{fixture, input_ids, max_diff, read_npy};
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::{EncodeOptions, LayerAttention, ModelDir};

fn conforms(name: &str) {
    let dir = ModelDir::open(&fixture(name)).unwrap();
    assert!(dir.model.is_causal());
    let ids = input_ids(name);
    let golden = read_npy::<f32>(&fixture(name).join("last_hidden_state.npy"));
    let golden_lp = read_npy::<f32>(&fixture(name).join("logprobs.npy"));
    assert_eq!(golden_lp.len(), ids.len() - 1);
    let doc = dir.model.prepare(ids.clone(), &EncodeOptions::default()).unwrap();
    let n = ids.len();
    for ranks in 1..=4 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let plan = ShardPlan::new(layout, n, ranks).unwrap();
            let outs = run_ranks(ranks, |g: &InProcessGroup| -> tome_model::Result<(Tensor, Vec<i64>, Tensor)> {
                let h = dir.model.forward_shard(g, &plan, &doc, &mut |_| true)?;
                let lp = dir.model.log_probs(&h, &doc.next_ids(&plan, g.rank()))?;
                Ok((h, plan.positions(g.rank()), lp))
            })
            .unwrap();
            let shards: Vec<Tensor> = outs.iter().map(|o| o.0.clone()).collect();
            let hidden: Vec<f32> = plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let d = max_diff(&hidden, &golden);
            assert!(d <= 1e-4, "{name}, {ranks} ranks {layout:?}: hidden states differ by {d}");
            let mut lp = vec![f32::NAN; n - 1];
            for (_, positions, values) in &outs {
                for (&p, v) in positions.iter().zip(values.to_vec1::<f32>().unwrap()) {
                    lp[p as usize] = v;
                }
            }
            let d = max_diff(&lp, &golden_lp);
            assert!(d <= 1e-4, "{name}, {ranks} ranks {layout:?}: log-probs differ by {d}");
        }
    }
}

#[test]
fn gpt2_matches_transformers_on_any_number_of_ranks() {
    conforms("gpt2-tiny");
}

#[test]
fn llama_matches_transformers_on_any_number_of_ranks() {
    conforms("llama-tiny");
}

#[test]
fn causal_models_refuse_what_would_change_their_outputs() {
    let gpt2 = ModelDir::open(&fixture("gpt2-tiny")).unwrap();
    let err = gpt2.model.prepare(vec![1; 65], &EncodeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("64 positions"), "{err}");
    let err = gpt2.model.prepare(vec![1, 500], &EncodeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
    let llama = ModelDir::open(&fixture("llama-tiny")).unwrap();
    let window = EncodeOptions { attention: Some(LayerAttention::Window { one_sided: 4 }), ..Default::default() };
    assert!(llama.model.prepare(vec![1, 2, 3], &window).unwrap_err().to_string().contains("dense causal"));
    let global = EncodeOptions { global_tokens: vec![0], ..Default::default() };
    assert!(llama.model.prepare(vec![1, 2, 3], &global).is_err());
    // Rotary positions are computed: Llama runs documents past max_position_embeddings.
    assert!(llama.model.prepare(vec![1; 100], &EncodeOptions::default()).is_ok());
    // An encoder does not score tokens.
    let bert = ModelDir::open(&fixture("bert-tiny")).unwrap();
    let h = Tensor::zeros((2, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(bert.model.log_probs(&h, &[1]).unwrap_err().to_string().contains("causal"));
}
