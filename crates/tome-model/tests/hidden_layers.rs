//! Hidden states of a chosen layer: `output_layer = k` gives transformers' `hidden_states[k]`
//! (0 the embeddings, the layer count the last hidden state — through GPT-2's and ModernBERT's
//! final norm, which only the last gets), on 1..3 ranks.

mod common;

use candle_core::Tensor;
use common::{fixture, input_ids, max_diff, read_npy};
use tome_dist::{run_ranks, InProcessGroup, Layout};
use tome_model::{EncodeOptions, ModelDir};

fn check_every_layer(name: &str) {
    let dir = ModelDir::open(&fixture(name)).unwrap();
    let layers = dir.model.shape().num_layers;
    let golden = read_npy::<f32>(&fixture(name).join("hidden_states.npy"));
    let per_layer = golden.len() / (layers + 1);
    for k in 0..=layers {
        let opts = EncodeOptions { output_layer: Some(k), ..Default::default() };
        let doc = dir.model.prepare(input_ids(name), &opts).unwrap();
        assert_eq!(doc.layers_run(), k);
        for ranks in 1..=3 {
            let plan = doc.plan(Layout::Zigzag, ranks).unwrap();
            let shards: Vec<Tensor> = run_ranks(ranks, |g: &InProcessGroup| dir.model.forward_shard(g, &plan, &doc, &mut |_| true)).unwrap();
            let got: Vec<f32> = plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let d = max_diff(&got, &golden[k * per_layer..(k + 1) * per_layer]);
            assert!(d <= 1e-4, "{name} layer {k}, {ranks} ranks: {d}");
        }
    }
    let beyond = EncodeOptions { output_layer: Some(layers + 1), ..Default::default() };
    let err = dir.model.prepare(input_ids(name), &beyond).unwrap_err().to_string();
    assert!(err.contains(&format!("the model has {layers} layers")), "{err}");
}

#[test]
fn bert_hidden_states_of_every_layer() {
    check_every_layer("bert-tiny");
}

#[test]
fn gpt2_hidden_states_of_every_layer() {
    check_every_layer("gpt2-tiny");
}

#[test]
fn mpnet_hidden_states_of_every_layer() {
    check_every_layer("mpnet-tiny");
}

#[test]
fn modernbert_hidden_states_of_every_layer() {
    check_every_layer("modernbert-tiny");
}
