//! Checkpoint directories as people have them: weights split over several safetensors files
//! under `model.safetensors.index.json` load and compute as the single file does; PyTorch-only
//! directories and indexes that point outside the directory are refused with what to do.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::{assert_hidden_states_match, fixture, input_ids};
use tome_model::{EncodeOptions, ModelDir};

/// A fresh directory holding fixture `name`'s config.json.
fn scratch(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tome-checkpoint-{name}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture(name).join("config.json"), dir.join("config.json")).unwrap();
    dir
}

#[test]
fn weights_split_over_indexed_files_give_the_single_files_outputs() {
    let dir = scratch("bert-tiny", "sharded");
    let tensors = candle_core::safetensors::load(fixture("bert-tiny").join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    // Two files, as transformers writes them, and the index mapping each tensor to its file.
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let shard: HashMap<String, Tensor> = part.iter().map(|&n| (n.clone(), tensors[n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for &n in part {
            weight_map.insert(n.clone(), file.into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();

    let model = ModelDir::open(&dir).unwrap();
    let doc = model.model.prepare(input_ids("bert-tiny"), &EncodeOptions::default()).unwrap();
    assert_hidden_states_match("bert-tiny", &model, &doc);

    // A missing shard, and an index naming a file outside the directory, are named.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = ModelDir::open(&dir).err().unwrap().to_string();
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
    let outside = serde_json::json!({ "weight_map": { "embeddings.word_embeddings.weight": "../model.safetensors" } });
    std::fs::write(dir.join("model.safetensors.index.json"), outside.to_string()).unwrap();
    let err = ModelDir::open(&dir).err().unwrap().to_string();
    assert!(err.contains("../model.safetensors") && err.contains("not a .safetensors file of the directory"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn pytorch_only_checkpoints_are_refused_with_how_to_convert() {
    let dir = scratch("bert-tiny", "pytorch");
    std::fs::write(dir.join("pytorch_model.bin"), b"not read").unwrap();
    let err = ModelDir::open(&dir).err().unwrap().to_string();
    assert!(err.contains("pytorch_model.bin") && err.contains("save_pretrained") && err.contains("safe_serialization=True"), "{err}");
    std::fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
    let err = ModelDir::open(&dir).err().unwrap().to_string();
    assert!(err.contains("has no model.safetensors"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
