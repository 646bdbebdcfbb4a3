//! bf16 runs (weights and attention inputs in bfloat16, products accumulated in f32) against
//! transformers' f32 goldens, within each model's stated bound, on 1..4 ranks in both layouts;
//! bf16 on P ranks against bf16 on one rank; and the refusal of models without a bf16 path.

mod common;

use common::{fixture, input_ids, max_diff, read_npy};
use tome_attn::Precision;
use tome_dist::{run_ranks, InProcessGroup, Layout, ShardPlan};
use tome_model::{EncodeOptions, LayerAttention, ModelDir, Prepared};

/// A fixture run in bf16 and the bounds its README row states.
struct Case {
    name: &'static str,
    opts: EncodeOptions,
    /// Largest |bf16 − f32 golden| over the last hidden state.
    hidden: f32,
    /// Smallest cosine between the bf16 and golden mean-pooled embeddings.
    cosine: f64,
    /// Largest |P ranks − 1 rank| in bf16: partials merge in another order over P ranks, which
    /// moves f32 sums by an ulp or so, and a value that then lies on the other side of a bf16
    /// rounding boundary moves by a bf16 ulp in the next layer's inputs.
    ranks: f32,
}

fn bf16(opts: EncodeOptions) -> EncodeOptions {
    EncodeOptions { precision: Precision::Bf16, ..opts }
}

fn cases() -> Vec<Case> {
    let globals = read_npy::<i64>(&fixture("longformer-tiny").join("global_tokens.npy")).into_iter().map(|g| g as usize).collect();
    let window = EncodeOptions { attention: Some(LayerAttention::window(200).unwrap()), ..Default::default() };
    vec![
        Case { name: "bert-tiny", opts: bf16(EncodeOptions::default()), hidden: 5e-2, cosine: 0.9999, ranks: 1e-2 },
        Case { name: "roberta-tiny", opts: bf16(EncodeOptions::default()), hidden: 5e-2, cosine: 0.9999, ranks: 1e-2 },
        Case { name: "xlm-roberta-long-tiny", opts: bf16(EncodeOptions::default()), hidden: 5e-2, cosine: 0.9999, ranks: 1e-2 },
        Case { name: "longformer-tiny", opts: bf16(EncodeOptions { global_tokens: globals, ..Default::default() }), hidden: 5e-2, cosine: 0.9999, ranks: 1e-2 },
        Case { name: "big-bird-tiny", opts: bf16(EncodeOptions::default()), hidden: 5e-2, cosine: 0.9999, ranks: 1e-2 },
        Case { name: "performer-tiny", opts: bf16(EncodeOptions::default()), hidden: 5e-2, cosine: 0.9999, ranks: 1e-2 },
        // bert-tiny's dense golden, through window attention wider than the document (the
        // streamed key path, whose keys are projected into place a chunk at a time).
        Case { name: "bert-tiny", opts: bf16(window), hidden: 5e-2, cosine: 0.9999, ranks: 1e-2 },
    ]
}

fn hidden(dir: &ModelDir, doc: &Prepared, ranks: usize, layout: Layout) -> Vec<f32> {
    let plan = ShardPlan::new(layout, doc.len(), ranks).unwrap();
    let shards = run_ranks(ranks, |g: &InProcessGroup| dir.model.forward_shard(g, &plan, doc, &mut |_| true)).unwrap();
    plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn mean_pool(h: &[f32], width: usize) -> Vec<f64> {
    let rows = h.len() / width;
    (0..width).map(|j| (0..rows).map(|i| h[i * width + j] as f64).sum::<f64>() / rows as f64).collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f64>().sqrt() * b.iter().map(|x| x * x).sum::<f64>().sqrt())
}

#[test]
fn bf16_runs_stay_within_each_models_stated_bound_of_transformers_on_any_number_of_ranks() {
    for case in cases() {
        let dir = ModelDir::open(&fixture(case.name)).unwrap();
        let golden = read_npy::<f32>(&fixture(case.name).join("last_hidden_state.npy"));
        let width = dir.model.shape().hidden_size;
        let doc = dir.model.prepare(input_ids(case.name), &case.opts).unwrap();
        let one = hidden(&dir, &doc, 1, Layout::Contiguous);
        let f32_doc = dir.model.prepare(input_ids(case.name), &EncodeOptions { precision: Precision::F32, ..case.opts.clone() }).unwrap();
        assert!(max_diff(&hidden(&dir, &f32_doc, 1, Layout::Contiguous), &one) > 0.0, "{}: the bf16 run gave the f32 bits", case.name);
        let (mut worst_hidden, mut worst_cosine, mut worst_ranks) = (0f32, 1f64, 0f32);
        for ranks in 1..=4 {
            for layout in [Layout::Contiguous, Layout::Zigzag] {
                let got = if ranks == 1 && layout == Layout::Contiguous { one.clone() } else { hidden(&dir, &doc, ranks, layout) };
                worst_hidden = worst_hidden.max(max_diff(&got, &golden));
                worst_cosine = worst_cosine.min(cosine(&mean_pool(&got, width), &mean_pool(&golden, width)));
                worst_ranks = worst_ranks.max(max_diff(&got, &one));
            }
        }
        eprintln!("{} ({:?}): hidden {worst_hidden:.2e}, cosine {worst_cosine:.7}, P ranks vs 1 {worst_ranks:.2e}", case.name, case.opts.attention.map(|a| a.to_string()));
        assert!(worst_hidden <= case.hidden, "{}: bf16 hidden states {worst_hidden} from the f32 golden (bound {})", case.name, case.hidden);
        assert!(worst_cosine >= case.cosine, "{}: embedding cosine {worst_cosine} (bound {})", case.name, case.cosine);
        assert!(worst_ranks <= case.ranks, "{}: P ranks {worst_ranks} from 1 rank (bound {})", case.name, case.ranks);
    }
}

#[test]
fn models_without_a_bf16_path_refuse_it_by_name() {
    let dir = ModelDir::open(&fixture("gpt2-tiny")).unwrap();
    let refused = dir.model.prepare(input_ids("gpt2-tiny"), &bf16(EncodeOptions::default())).unwrap_err().to_string();
    assert!(refused.contains("gpt2") && refused.contains("bf16") && refused.contains("f32"), "{refused}");
}
