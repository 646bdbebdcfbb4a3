//! GPT-2 (causal dense attention as ring attention, tied LM head) against Hugging Face
//! transformers (fixture `gpt2-tiny` from scripts/gen_fixtures.py, with
//! `scale_attn_by_inverse_layer_idx`): hidden states and per-token log-probabilities on 1..4
//! ranks in both layouts, each rank scoring its own tokens.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::gpt2::{Gpt2Config, Gpt2Model};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny")
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

fn load() -> Gpt2Model {
    let cfg: Gpt2Config = serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    // SAFETY: the fixture file is only read.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[fixture().join("model.safetensors")], DType::F32, &Device::Cpu).unwrap() };
    Gpt2Model::load(vb, &cfg).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn hidden_states_and_log_probs_match_transformers_on_any_number_of_ranks() {
    let model = load();
    let ids: Vec<u32> = read_npy::<i64>(&fixture().join("input_ids.npy")).into_iter().map(|i| i as u32).collect();
    let golden = read_npy::<f32>(&fixture().join("last_hidden_state.npy"));
    let golden_lp = read_npy::<f32>(&fixture().join("logprobs.npy"));
    assert_eq!(golden_lp.len(), ids.len() - 1);
    let n = ids.len();
    for ranks in 1..=4 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let plan = ShardPlan::new(layout, n, ranks).unwrap();
            let outs = run_ranks(ranks, |g: &InProcessGroup| -> tome_model::Result<(Tensor, Vec<i64>, Tensor)> {
                let h = model.forward_shard(g, &plan, &ids)?;
                // Each rank scores its own rows: the next token of every position but the last.
                let positions = plan.positions(g.rank());
                let next: Vec<u32> = positions.iter().filter(|&&p| (p as usize) + 1 < n).map(|&p| ids[p as usize + 1]).collect();
                let lp = model.log_probs(&h, &next)?;
                Ok((h, positions, lp))
            })
            .unwrap();
            let shards: Vec<Tensor> = outs.iter().map(|o| o.0.clone()).collect();
            let hidden: Vec<f32> = plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let d = max_diff(&hidden, &golden);
            assert!(d <= 1e-4, "{ranks} ranks {layout:?}: hidden states differ by {d}");
            let mut lp = vec![f32::NAN; n - 1];
            for (_, positions, values) in &outs {
                for (&p, v) in positions.iter().zip(values.to_vec1::<f32>().unwrap()) {
                    lp[p as usize] = v;
                }
            }
            let d = max_diff(&lp, &golden_lp);
            assert!(d <= 1e-4, "{ranks} ranks {layout:?}: log-probs differ by {d}");
        }
    }
    let ppl = (-golden_lp.iter().map(|&x| x as f64).sum::<f64>() / golden_lp.len() as f64).exp();
    assert!(ppl.is_finite() && ppl > 1.0);
}

#[test]
fn documents_past_the_learned_positions_and_unknown_ids_are_refused() {
    let model = load();
    let long = vec![1u32; 65];
    let plan = ShardPlan::new(Layout::Contiguous, long.len(), 1).unwrap();
    let err = model.forward_shard(&InProcessGroup::single(), &plan, &long).unwrap_err();
    assert!(err.to_string().contains("64 positions"), "{err}");
    let bad = vec![1u32, 500];
    let plan = ShardPlan::new(Layout::Contiguous, 2, 1).unwrap();
    let err = model.forward_shard(&InProcessGroup::single(), &plan, &bad).unwrap_err();
    assert!(err.to_string().contains("vocabulary"), "{err}");
}
