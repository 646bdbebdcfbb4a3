//! MPNet (`mpnet-tiny`: transformers 5.24.0's MPNetModel, 2 layers, a 300-token document so
//! that relative distances reach past the bias's max distance of 128) against its golden,
//! loaded as the services load it (its `model_type` through the registry): 1 rank against
//! transformers, and 2..5 ranks, both layouts, each rank given only its own tokens, against one
//! rank. The relative-position bucket is held to transformers' for every distance it was
//! dumped for.

mod common;

use common::{fixture, fixture_with_config, input_ids, max_diff, read_npy};
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::mpnet::{MpnetConfig, MpnetModel};
use tome_model::{EncodeOptions, LayerAttention, ModelDir, ModelType, PositionExtension};

const NAME: &str = "mpnet-tiny";

#[test]
fn mpnet_matches_transformers_and_any_number_of_ranks_matches_one() {
    let dir = ModelDir::open(&fixture(NAME)).unwrap();
    let model = &dir.model;
    assert_eq!(model.shape().model_type, ModelType::Mpnet.name());
    assert!(!model.is_causal());
    let ids = input_ids(NAME);
    assert_eq!(ids.len(), 300);
    let golden = read_npy::<f32>(&fixture(NAME).join("last_hidden_state.npy"));
    let doc = model.prepare(ids.clone(), &EncodeOptions::default()).unwrap();
    assert_eq!(doc.layers, vec![LayerAttention::Dense; 2]);
    // RoBERTa-style positions from the hard-coded padding index 1.
    assert_eq!(&doc.position_ids[..3], &[2, 3, 4]);
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
    let d = max_diff(&one, &golden);
    eprintln!("mpnet-tiny: 1 rank vs transformers {d:.2e}");
    assert!(d <= 1e-4, "1 rank vs transformers: {d}");
    for ranks in 2..=5 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let many = run(ranks, layout);
            let d = max_diff(&many, &one);
            eprintln!("mpnet-tiny: {ranks} ranks {layout:?} vs 1 rank {d:.2e}");
            assert!(d <= 1e-5, "{ranks} ranks {layout:?} vs 1 rank: {d}");
            assert!(max_diff(&many, &golden) <= 1e-4);
        }
    }
}

#[test]
fn relative_buckets_are_transformers_for_every_distance() {
    let dir = fixture(NAME);
    let cfg: MpnetConfig = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], candle_core::DType::F32, &candle_core::Device::Cpu) }.unwrap();
    let model = MpnetModel::load(vb, &cfg).unwrap();
    let want = read_npy::<i64>(&dir.join("relative_buckets.npy"));
    let half = (want.len() / 2) as i64;
    let got: Vec<i64> = (-half..=half).map(|r| model.bucket(r) as i64).collect();
    assert_eq!(got, want);
}

#[test]
fn mpnet_refuses_what_would_change_its_outputs() {
    let dir = ModelDir::open(&fixture(NAME)).unwrap();
    // 514 positions, 512 usable.
    let err = dir.model.prepare(vec![5; 513], &EncodeOptions::default()).unwrap_err().to_string();
    assert!(err.contains("512 positions"), "{err}");
    let tiled = dir.model.prepare(vec![5; 513], &EncodeOptions { position_extension: PositionExtension::Tile, ..Default::default() }).unwrap();
    assert_eq!(tiled.position_ids[512], 2);
    // Padding tokens take the padding position and are not counted.
    let doc = dir.model.prepare(vec![5, 1, 5], &EncodeOptions::default()).unwrap();
    assert_eq!(doc.position_ids, vec![2, 1, 3]);
    let window = EncodeOptions { attention: Some(LayerAttention::Window { one_sided: 4 }), ..Default::default() };
    assert!(dir.model.prepare(vec![5; 10], &window).unwrap_err().to_string().contains("would change its outputs"));
    assert!(dir.model.prepare(vec![5, 99], &EncodeOptions::default()).unwrap_err().to_string().contains("vocabulary"));
    // An unknown activation is a config error, and so is a bucket count MPNet never uses.
    let path = fixture_with_config(NAME, "act", |c| c["hidden_act"] = "quick_gelu".into());
    let err = ModelDir::open(&path).err().unwrap().to_string();
    assert!(err.contains("quick_gelu"), "{err}");
    std::fs::remove_dir_all(path).unwrap();
    let path = fixture_with_config(NAME, "buckets", |c| c["relative_attention_num_buckets"] = 64.into());
    let err = ModelDir::open(&path).err().unwrap().to_string();
    assert!(err.contains("relative_attention_num_buckets"), "{err}");
    std::fs::remove_dir_all(path).unwrap();
}
