//! Models on a GPU rank: the BERT family's (Longformer's global tokens and BigBird's blocks
//! among them), GPT-2's, GPT-Neo's and Llama's fixtures against transformers' goldens (≤ 1e-4) on
//! 1..4 ranks sharing the GPU in both layouts, P ranks against one rank (≤ 1e-5), against the
//! CPU path, and what a GPU rank refuses by name. These need a GPU, NVRTC and cuBLAS: a plain
//! `cargo test` ignores them (nothing here counts as passed without one); scripts/gpu-check.sh
//! runs them with `--ignored`, where no GPU is an error.

mod common;

use candle_core::Tensor;
use common::{fixture, input_ids, max_diff, read_npy};
use tome_attn::Precision;
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::gpu::GpuRank;
use tome_model::{EncodeOptions, LayerAttention, ModelDir, ModelError, Prepared};

/// The document's last hidden state from `ranks` ranks on GPU 0 (each rank its own stream).
fn on_gpu(dir: &ModelDir, doc: &Prepared, ranks: usize, layout: Layout) -> Result<Vec<f32>, ModelError> {
    let plan = ShardPlan::new(layout, doc.len(), ranks)?;
    let shards: Vec<Tensor> = run_ranks(ranks, |g: &InProcessGroup| {
        let rank = GpuRank::lease(0)?;
        dir.model.forward_on(Some(&rank), g, &plan, &doc.shard(&plan, g.rank()), &mut |_| true)
    })?;
    Ok(plan.unshard(&shards, 0)?.flatten_all()?.to_vec1()?)
}

fn on_cpu(dir: &ModelDir, doc: &Prepared) -> Vec<f32> {
    let plan = ShardPlan::new(Layout::Contiguous, doc.len(), 1).unwrap();
    let shards: Vec<Tensor> = run_ranks(1, |g: &InProcessGroup| dir.model.forward_shard(g, &plan, doc, &mut |_| true)).unwrap();
    plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Longformer's fixture's global tokens.
fn global_tokens() -> Vec<usize> {
    read_npy::<i64>(&fixture("longformer-tiny").join("global_tokens.npy")).into_iter().map(|g| g as usize).collect()
}

/// The BERT family's fixtures, dense and through a window wider than the document (bert-tiny's
/// dense golden holds for both), Longformer (windows of 4 and 8 with three global tokens),
/// BigBird (blocks of 4, one random block), GPT-2, GPT-Neo (dense and local layers) and Llama
/// (causal, grouped-query heads).
fn cases() -> Vec<(&'static str, EncodeOptions)> {
    let window = EncodeOptions { attention: Some(LayerAttention::window(200).unwrap()), ..Default::default() };
    let narrow = EncodeOptions { attention: Some(LayerAttention::window(8).unwrap()), ..Default::default() };
    vec![
        ("bert-tiny", EncodeOptions::default()),
        ("roberta-tiny", EncodeOptions::default()),
        ("xlm-roberta-long-tiny", EncodeOptions::default()),
        ("longformer-tiny", EncodeOptions { global_tokens: global_tokens(), ..Default::default() }),
        ("big-bird-tiny", EncodeOptions::default()),
        ("gpt2-tiny", EncodeOptions::default()),
        ("llama-tiny", EncodeOptions::default()),
        ("gpt-neo-tiny", EncodeOptions::default()),
        ("bert-tiny", window),
        // A window narrower than a shard: halos cross ranks (no golden; the CPU path is the check).
        ("bert-tiny", narrow),
    ]
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn the_bert_family_on_a_gpu_matches_transformers_and_one_rank_on_any_number_of_ranks() {
    for (name, opts) in cases() {
        let dir = ModelDir::open(&fixture(name)).unwrap();
        let doc = dir.model.prepare(input_ids(name), &opts).unwrap();
        let cpu = on_cpu(&dir, &doc);
        let golden = read_npy::<f32>(&fixture(name).join("last_hidden_state.npy"));
        let narrow = matches!(opts.attention, Some(LayerAttention::Window { one_sided }) if one_sided < doc.len());
        let one = on_gpu(&dir, &doc, 1, Layout::Contiguous).unwrap_or_else(|e| panic!("{name}: {e}"));
        let d = max_diff(&one, &cpu);
        assert!(d <= 1e-4, "{name} {:?}: GPU against CPU {d}", opts.attention);
        if !narrow {
            let d = max_diff(&one, &golden);
            assert!(d <= 1e-4, "{name} {:?}: GPU against transformers {d}", opts.attention);
        }
        for ranks in 2..=4 {
            for layout in [Layout::Contiguous, Layout::Zigzag] {
                let got = on_gpu(&dir, &doc, ranks, layout).unwrap_or_else(|e| panic!("{name}: {e}"));
                let d = max_diff(&got, &one);
                assert!(d <= 1e-5, "{name} {:?}, {ranks} ranks {layout:?}: {d} from one rank", opts.attention);
            }
        }
    }
}

/// bf16 and f16 on a GPU (weights and what enters a product or attention rounded to them,
/// products on tensor cores accumulated in f32): within the bound each model is held to in bf16
/// on the CPU (crates/tome-model/tests/bf16.rs) of transformers' f32 golden — f16 keeps 3 more
/// mantissa bits than bf16, and these activations stay far inside its range — and P ranks
/// within 1e-2 of one.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn bf16_and_f16_on_a_gpu_stay_within_each_models_bound_on_any_number_of_ranks() {
    let cases = [
        ("bert-tiny", 0.05),
        ("roberta-tiny", 0.03),
        ("xlm-roberta-long-tiny", 0.03),
        ("longformer-tiny", 0.04),
        ("big-bird-tiny", 0.04),
        ("gpt2-tiny", 0.04),
        ("gpt-neo-tiny", 0.2),
        ("llama-tiny", 0.01),
    ];
    for precision in [Precision::Bf16, Precision::F16] {
        for (name, bound) in cases {
            let dir = ModelDir::open(&fixture(name)).unwrap();
            let global_tokens = if name == "longformer-tiny" { global_tokens() } else { Vec::new() };
            let doc = dir.model.prepare(input_ids(name), &EncodeOptions { global_tokens, precision, ..Default::default() }).unwrap();
            let golden = read_npy::<f32>(&fixture(name).join("last_hidden_state.npy"));
            let one = on_gpu(&dir, &doc, 1, Layout::Contiguous).unwrap_or_else(|e| panic!("{name} {precision}: {e}"));
            let d = max_diff(&one, &golden);
            eprintln!("{name} {precision} on a GPU: max |{precision} - f32 golden| = {d}");
            assert!(d <= bound, "{name} {precision}: {d} from transformers' f32, bound {bound}");
            for ranks in 2..=4 {
                let got = on_gpu(&dir, &doc, ranks, Layout::Zigzag).unwrap_or_else(|e| panic!("{name} {precision}: {e}"));
                assert!(max_diff(&got, &one) <= 1e-2, "{name} {precision}, {ranks} ranks");
            }
        }
    }
}

/// BigBird on 46 tokens: two padding tokens complete the last (global) block on the rank holding
/// the document's end, never attended to and dropped, as transformers pads.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn big_bird_pads_partial_blocks_as_transformers_on_a_gpu() {
    let dir = ModelDir::open(&fixture("big-bird-tiny")).unwrap();
    let doc = dir.model.prepare(input_ids("big-bird-tiny")[..46].to_vec(), &EncodeOptions::default()).unwrap();
    let golden = read_npy::<f32>(&fixture("big-bird-tiny").join("last_hidden_state_first46.npy"));
    let one = on_gpu(&dir, &doc, 1, Layout::Contiguous).unwrap();
    assert!(max_diff(&one, &golden) <= 1e-4, "{}", max_diff(&one, &golden));
    for ranks in 2..=4 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let got = on_gpu(&dir, &doc, ranks, layout).unwrap();
            assert!(max_diff(&got, &one) <= 1e-5, "{ranks} ranks {layout:?}");
        }
    }
}

/// Ranks without rows (3 tokens on 4 ranks) take part in their peers' exchanges and return no
/// rows; the document's rows are one rank's.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn ranks_without_rows_take_part_and_give_the_one_rank_result() {
    let dir = ModelDir::open(&fixture("bert-tiny")).unwrap();
    let ids: Vec<u32> = input_ids("bert-tiny").into_iter().take(3).collect();
    for (attention, global_tokens) in [(LayerAttention::Dense, vec![]), (LayerAttention::window(2).unwrap(), vec![]), (LayerAttention::window(2).unwrap(), vec![1])] {
        let doc = dir.model.prepare(ids.clone(), &EncodeOptions { attention: Some(attention), global_tokens, ..Default::default() }).unwrap();
        let one = on_gpu(&dir, &doc, 1, Layout::Contiguous).unwrap();
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let four = on_gpu(&dir, &doc, 4, layout).unwrap_or_else(|e| panic!("{attention:?} {layout:?}: {e}"));
            assert!(max_diff(&four, &one) <= 1e-5, "{attention:?} {layout:?}");
        }
    }
}

#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn a_gpu_rank_refuses_what_it_cannot_run_by_name() {
    let refused = |name: &str, opts: EncodeOptions, says: &[&str]| {
        let dir = ModelDir::open(&fixture(name)).unwrap();
        let doc = dir.model.prepare(input_ids(name), &opts).unwrap();
        let err = on_gpu(&dir, &doc, 1, Layout::Contiguous).expect_err(name).to_string();
        for s in says {
            assert!(err.contains(s), "{name}: {err:?} should say {s:?}");
        }
    };
    refused("mpnet-tiny", EncodeOptions::default(), &["mpnet", "does not run on a GPU rank"]);
    refused("performer-tiny", EncodeOptions::default(), &["favor", "attention does not run on a GPU rank"]);
}

/// The footprint a worker measures at start predicts a third run's measured peak: the line
/// through two lengths' peaks holds at a length between them, and the measurement leaves no
/// weights behind.
#[test]
#[ignore = "needs a GPU: scripts/gpu-check.sh runs it"]
fn a_measured_gpu_footprint_predicts_the_peak_of_another_length() {
    use tome_gpu::{Gpu, PoolMeter};
    use tome_model::gpu::footprint::measure;
    for name in ["bert-tiny", "gpt2-tiny", "llama-tiny"] {
        let dir = ModelDir::open(&fixture(name)).unwrap();
        let meter = PoolMeter::new(&Gpu::open(0).unwrap()).unwrap();
        let before = meter.used().unwrap();
        let f = measure(&dir.model, 0, Precision::F32).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(f.weight_bytes > 0 && f.rank_bytes_per_token > 0, "{name}: {f:?}");
        assert_eq!(meter.used().unwrap(), before, "{name}: the measurement freed the weights it uploaded");
        let tokens = dir.model.shape().max_positions.unwrap_or(1024).min(1024) * 3 / 4;
        let vocab = dir.model.shape().vocab_size;
        let ids: Vec<u32> = (0..tokens).map(|i| ((vocab / 2 + i) % vocab) as u32).collect();
        let doc = dir.model.prepare(ids, &EncodeOptions::default()).unwrap();
        on_gpu(&dir, &doc, 2, Layout::Contiguous).unwrap(); // the weights uploaded again
        let resident = meter.used().unwrap();
        meter.reset_peak().unwrap();
        on_gpu(&dir, &doc, 2, Layout::Contiguous).unwrap();
        let peak = meter.peak().unwrap() - resident;
        let predicted = 2 * f.rank_base_bytes + f.rank_bytes_per_token * tokens as u64;
        eprintln!("{name}: {f:?}; {tokens} tokens on 2 ranks peaked at {peak} bytes, predicted {predicted}");
        assert!(peak as f64 <= predicted as f64 * 1.1 + 65536.0 && peak as f64 >= predicted as f64 * 0.8, "{name}: peak {peak}, predicted {predicted}");
    }
}
