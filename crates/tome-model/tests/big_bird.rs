//! BigBird against Hugging Face transformers (fixture `big-bird-tiny` from
//! scripts/gen_fixtures.py): block-sparse attention (blocks of 4, one random block, transformers'
//! eval-mode plan) on 1..4 ranks in both layouts; short documents fall back to full attention
//! as transformers does; lengths that are not whole blocks are refused.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use tome_dist::{run_ranks, InProcessGroup, Layout, ShardPlan};
use tome_model::{EncodeOptions, LayerAttention, ModelDir};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/big-bird-tiny")
}

fn read_npy<T: npyz::Deserialize>(path: &Path) -> Vec<T> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

#[test]
fn block_sparse_attention_matches_transformers_on_any_number_of_ranks() {
    let dir = ModelDir::open(&fixture()).unwrap();
    let ids: Vec<u32> = read_npy::<i64>(&fixture().join("input_ids.npy")).into_iter().map(|i| i as u32).collect();
    let golden = read_npy::<f32>(&fixture().join("last_hidden_state.npy"));
    let doc = dir.model.prepare(ids.clone(), &EncodeOptions::default()).unwrap();
    assert_eq!(doc.layers[0], LayerAttention::BlockSparse { block: 4, random: 1 });
    for ranks in 1..=4 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let plan = ShardPlan::new(layout, ids.len(), ranks).unwrap();
            let shards: Vec<Tensor> = run_ranks(ranks, |g: &InProcessGroup| dir.model.forward_shard(g, &plan, &doc, &mut |_| true)).unwrap();
            let got: Vec<f32> = plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let d = got.iter().zip(&golden).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(d <= 1e-4, "{ranks} ranks {layout:?}: {d}");
        }
    }
    // At most (5 + 2 r) blocks: full attention, as transformers switches to it.
    let short = dir.model.prepare(ids[..28].to_vec(), &EncodeOptions::default()).unwrap();
    assert!(short.layers.iter().all(|l| *l == LayerAttention::Dense));
    // Not whole blocks: refused, never padded silently.
    let err = dir.model.prepare(ids[..46].to_vec(), &EncodeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("multiple of block_size 4"), "{err}");
}
