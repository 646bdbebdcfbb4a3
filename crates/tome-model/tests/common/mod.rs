//! What the architecture tests share: fixtures, .npy reading, and the check that a model's last
//! hidden state equals the golden on 1..4 ranks in both layouts.
#![allow(dead_code)] // each test crate uses its own part

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tome_dist::{run_ranks, InProcessGroup, Layout, ShardPlan};
use tome_model::{ModelDir, Prepared};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn read_npy<T: npyz::Deserialize>(path: &Path) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

/// The fixture's token ids.
pub fn input_ids(name: &str) -> Vec<u32> {
    read_npy::<i64>(&fixture(name).join("input_ids.npy")).into_iter().map(|i| i as u32).collect()
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

/// Asserts that `doc` through `dir`'s model gives the fixture's `last_hidden_state.npy` within
/// 1e-4 on 1..4 ranks, contiguous and zigzag.
pub fn assert_hidden_states_match(name: &str, dir: &ModelDir, doc: &Prepared) {
    assert_golden_match(name, "last_hidden_state.npy", dir, doc);
}

/// As [`assert_hidden_states_match`] against the fixture's `.npy` file `golden`.
pub fn assert_golden_match(name: &str, golden: &str, dir: &ModelDir, doc: &Prepared) {
    let golden = read_npy::<f32>(&fixture(name).join(golden));
    for ranks in 1..=4 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let plan = ShardPlan::new(layout, doc.len(), ranks).unwrap();
            let shards: Vec<Tensor> = run_ranks(ranks, |g: &InProcessGroup| dir.model.forward_shard(g, &plan, doc, &mut |_| true)).unwrap();
            let got: Vec<f32> = plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let d = max_diff(&got, &golden);
            assert!(d <= 1e-4, "{name}, {ranks} ranks {layout:?}: {d}");
        }
    }
}

/// Asserts that `doc` through `dir`'s model gives `golden` (a .npy of the fixture) within 1e-4 on
/// 1..4 ranks of the document's own plan, for architectures that keep tokens in order (the
/// zigzag layout is refused).
pub fn assert_in_order_match(name: &str, golden: &str, dir: &ModelDir, doc: &Prepared) {
    let want = read_npy::<f32>(&fixture(name).join(golden));
    for ranks in 1..=4 {
        let plan = doc.plan(Layout::Contiguous, ranks).unwrap();
        let shards: Vec<Tensor> = run_ranks(ranks, |g: &InProcessGroup| dir.model.forward_shard(g, &plan, doc, &mut |_| true)).unwrap();
        let got: Vec<f32> = plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let d = max_diff(&got, &want);
        assert!(d <= 1e-4, "{name} ({golden}), {ranks} ranks: {d}");
    }
    let refused = doc.plan(Layout::Zigzag, 2).unwrap_err().to_string();
    assert!(refused.contains("contiguous"), "{refused}");
}

/// A copy of fixture `name` (config and weights) in a fresh directory under the system's
/// temporary directory, with `edit` applied to its config.json.
pub fn fixture_with_config(name: &str, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tome-fixture-{name}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), dir.join(f)).unwrap();
    }
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string(&cfg).unwrap()).unwrap();
    dir
}
