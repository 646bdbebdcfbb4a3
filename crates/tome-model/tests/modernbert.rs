//! ModernBERT (`modernbert-tiny`: transformers 5.24.0's ModernBertModel, layers [global, local,
//! local, global], local_attention 32 so a local token sees 16 on each side, RoPE bases 160000
//! and 10000, GeGLU, LayerNorms without bias) on 90 tokens against its golden (eager, itself
//! checked against a forward by hand with the window |i - j| <= 16), loaded through the
//! registry: 1 rank against transformers, and 2..5 ranks in both layouts, each rank given only
//! its own tokens (shards shorter than the window included), against one rank. The config forms
//! of transformers 4 (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`)
//! and 5 (`layer_types`, `rope_parameters`) give the same model.

mod common;

use common::{fixture, fixture_with_config, input_ids, max_diff, read_npy};
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::{EncodeOptions, LayerAttention, ModelDir, ModelType};

const NAME: &str = "modernbert-tiny";

fn run(dir: &ModelDir, ids: &[u32], ranks: usize, layout: Layout) -> Vec<f32> {
    let doc = dir.model.prepare(ids.to_vec(), &EncodeOptions::default()).unwrap();
    let plan = ShardPlan::new(layout, ids.len(), ranks).unwrap();
    let shards = run_ranks(ranks, |g: &InProcessGroup| {
        let input = doc.shard(&plan, g.rank());
        assert_eq!(input.ids.len(), plan.positions(g.rank()).len(), "a rank receives its own tokens only");
        dir.model.forward(g, &plan, &input, &mut |_| true)
    })
    .unwrap();
    plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn modernbert_matches_transformers_and_any_number_of_ranks_matches_one() {
    let dir = ModelDir::open(&fixture(NAME)).unwrap();
    let shape = dir.model.shape();
    assert_eq!(shape.model_type, ModelType::ModernBert.name());
    assert_eq!(shape.layer_attention, vec!["dense", "window:32", "window:32", "dense"]);
    let ids = input_ids(NAME);
    assert_eq!(ids.len(), 90);
    let doc = dir.model.prepare(ids.clone(), &EncodeOptions::default()).unwrap();
    let w = LayerAttention::Window { one_sided: 16 };
    assert_eq!(doc.layers, vec![LayerAttention::Dense, w, w, LayerAttention::Dense]);
    let golden = read_npy::<f32>(&fixture(NAME).join("last_hidden_state.npy"));
    let one = run(&dir, &ids, 1, Layout::Contiguous);
    let d = max_diff(&one, &golden);
    eprintln!("{NAME}: 1 rank vs transformers {d:.2e}");
    assert!(d <= 1e-4, "1 rank vs transformers: {d}");
    for ranks in 2..=5 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let many = run(&dir, &ids, ranks, layout);
            let d = max_diff(&many, &one);
            eprintln!("{NAME}: {ranks} ranks {layout:?} vs 1 rank {d:.2e}");
            assert!(d <= 1e-5, "{ranks} ranks {layout:?} vs 1 rank: {d}");
            assert!(max_diff(&many, &golden) <= 1e-4);
        }
    }
}

#[test]
fn transformers_4_config_fields_give_the_same_model_and_choices_change_the_output() {
    let ids = input_ids(NAME);
    let golden = read_npy::<f32>(&fixture(NAME).join("last_hidden_state.npy"));
    // The fields ModernBERT checkpoints on the Hub carry (no layer_types, no rope_parameters).
    let path = fixture_with_config(NAME, "v4", |c| {
        let c = c.as_object_mut().unwrap();
        c.remove("layer_types");
        c.remove("rope_parameters");
        c.insert("global_rope_theta".into(), 160000.0.into());
        c.insert("local_rope_theta".into(), 10000.0.into());
        c.insert("global_attn_every_n_layers".into(), 3.into());
    });
    let dir = ModelDir::open(&path).unwrap();
    assert!(max_diff(&run(&dir, &ids, 2, Layout::Zigzag), &golden) <= 1e-4);
    std::fs::remove_dir_all(path).unwrap();
    // One token more or less on each side of the window, or swapped RoPE bases, are different
    // models: the golden pins the window at |i - j| <= 16.
    for (tag, edit) in [
        ("narrower", Box::new(|c: &mut serde_json::Value| c["local_attention"] = 30.into()) as Box<dyn FnOnce(&mut serde_json::Value)>),
        ("wider", Box::new(|c: &mut serde_json::Value| c["local_attention"] = 34.into())),
        ("theta", Box::new(|c: &mut serde_json::Value| c["rope_parameters"]["sliding_attention"]["rope_theta"] = 160000.0.into())),
    ] {
        let path = fixture_with_config(NAME, tag, edit);
        let dir = ModelDir::open(&path).unwrap();
        let d = max_diff(&run(&dir, &ids, 1, Layout::Contiguous), &golden);
        assert!(d > 1e-3, "{tag}: {d}");
        std::fs::remove_dir_all(path).unwrap();
    }
}

#[test]
fn modernbert_refuses_what_would_change_its_outputs() {
    let dir = ModelDir::open(&fixture(NAME)).unwrap();
    let dense = EncodeOptions { attention: Some(LayerAttention::Dense), ..Default::default() };
    assert!(dir.model.prepare(vec![5; 10], &dense).unwrap_err().to_string().contains("would change its outputs"));
    let global = EncodeOptions { global_tokens: vec![0], ..Default::default() };
    assert!(dir.model.prepare(vec![5; 10], &global).is_err());
    assert!(dir.model.prepare(vec![5, 99], &EncodeOptions::default()).unwrap_err().to_string().contains("vocabulary"));
    // Rotary positions are computed: documents past max_position_embeddings run.
    assert!(dir.model.prepare(vec![5; 200], &EncodeOptions::default()).is_ok());
    for (tag, field, edit) in [
        ("rope", "yarn", Box::new(|c: &mut serde_json::Value| c["rope_parameters"]["full_attention"]["rope_type"] = "yarn".into()) as Box<dyn FnOnce(&mut serde_json::Value)>),
        ("layer-type", "chunked_attention", Box::new(|c: &mut serde_json::Value| c["layer_types"][1] = "chunked_attention".into())),
        ("layers", "layer_types", Box::new(|c: &mut serde_json::Value| c["num_hidden_layers"] = 5.into())),
        ("act", "swiglu", Box::new(|c: &mut serde_json::Value| c["hidden_activation"] = "swiglu".into())),
        ("scaling", "rope_scaling", Box::new(|c: &mut serde_json::Value| c["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0}))),
    ] {
        let path = fixture_with_config(NAME, tag, edit);
        let err = ModelDir::open(&path).err().unwrap().to_string();
        assert!(err.contains(field), "{tag}: {err}");
        std::fs::remove_dir_all(path).unwrap();
    }
    // A config that says the LayerNorms have biases, over a checkpoint without them, names the
    // missing tensor.
    let path = fixture_with_config(NAME, "norm-bias", |c| c["norm_bias"] = true.into());
    let err = ModelDir::open(&path).err().unwrap().to_string();
    assert!(err.contains("norm.bias"), "{err}");
    std::fs::remove_dir_all(path).unwrap();
}
