//! XLM-RoBERTa with long positions, the shape of BAAI/bge-m3 (`xlm-roberta-long-tiny`:
//! transformers 5.24.0's XLMRobertaModel with 8,194 learned positions, 8,192 usable, and
//! sentence-transformers' CLS pooling and normalisation, tiny widths) on a 777-token document,
//! longer than the 512 positions of most encoders: the last hidden state against transformers'
//! and the CLS-pooled, L2-normalised embedding against sentence-transformers', on 1..5 ranks in
//! both layouts, each rank given only its own tokens, and any number of ranks against one.

mod common;

use candle_core::Tensor;
use common::{fixture, fixture_with_config, input_ids, max_diff, read_npy};
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::{l2_normalize, pool_spans, EncodeOptions, ModelDir, ModelType, Pooling};

const NAME: &str = "xlm-roberta-long-tiny";

#[test]
fn long_document_matches_transformers_and_sentence_transformers_on_any_number_of_ranks() {
    let dir = ModelDir::open(&fixture(NAME)).unwrap();
    let model = &dir.model;
    let shape = model.shape();
    assert_eq!(shape.model_type, ModelType::XlmRoberta.name());
    assert_eq!(shape.max_positions, Some(8192));
    // modules.json names the Pooling module (CLS, bge-m3's legacy flags) and ends in Normalize.
    assert_eq!(dir.pooling, Pooling::Cls);
    assert!(dir.normalize);
    let ids = input_ids(NAME);
    assert_eq!(ids.len(), 777);
    let golden = read_npy::<f32>(&fixture(NAME).join("last_hidden_state.npy"));
    let cls = read_npy::<f32>(&fixture(NAME).join("cls_embedding.npy"));
    let doc = model.prepare(ids.clone(), &EncodeOptions::default()).unwrap();
    // Positions past 512 are used: padding_idx + 1 = 2 onwards.
    assert_eq!(doc.position_ids.iter().max(), Some(&778));
    let run = |ranks: usize, layout: Layout| -> (Vec<f32>, Vec<f32>) {
        let plan = ShardPlan::new(layout, ids.len(), ranks).unwrap();
        let outs = run_ranks(ranks, |g: &InProcessGroup| -> tome_model::Result<(Tensor, Tensor)> {
            let input = doc.shard(&plan, g.rank());
            assert_eq!(input.ids.len(), plan.positions(g.rank()).len(), "a rank receives its own tokens only");
            let h = model.forward(g, &plan, &input, &mut |_| true)?;
            let pooled = pool_spans(g, &plan, &h, std::slice::from_ref(&(0..ids.len())), dir.pooling)?;
            Ok((h, l2_normalize(&pooled)?))
        })
        .unwrap();
        // Every rank holds the same embedding.
        let emb: Vec<f32> = outs[0].1.flatten_all().unwrap().to_vec1().unwrap();
        for (_, e) in &outs {
            assert_eq!(e.flatten_all().unwrap().to_vec1::<f32>().unwrap(), emb);
        }
        let shards: Vec<Tensor> = outs.into_iter().map(|o| o.0).collect();
        (plan.unshard(&shards, 0).unwrap().flatten_all().unwrap().to_vec1().unwrap(), emb)
    };
    let (one, one_emb) = run(1, Layout::Contiguous);
    let (d, de) = (max_diff(&one, &golden), max_diff(&one_emb, &cls));
    eprintln!("{NAME}: 1 rank vs transformers {d:.2e}, CLS embedding vs sentence-transformers {de:.2e}");
    assert!(d <= 1e-4, "1 rank vs transformers: {d}");
    assert!(de <= 1e-5, "1 rank's embedding vs sentence-transformers: {de}");
    for ranks in 2..=5 {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let (many, emb) = run(ranks, layout);
            let (d, de) = (max_diff(&many, &one), max_diff(&emb, &one_emb));
            eprintln!("{NAME}: {ranks} ranks {layout:?} vs 1 rank: hidden {d:.2e}, embedding {de:.2e}");
            assert!(d <= 1e-5 && de <= 1e-5, "{ranks} ranks {layout:?} vs 1 rank: hidden {d}, embedding {de}");
            assert!(max_diff(&many, &golden) <= 1e-4 && max_diff(&emb, &cls) <= 1e-5);
        }
    }
}

#[test]
fn the_long_table_holds_8192_tokens_and_no_more() {
    let dir = ModelDir::open(&fixture(NAME)).unwrap();
    let doc = dir.model.prepare(vec![5; 8192], &EncodeOptions::default()).unwrap();
    assert_eq!(doc.position_ids.last(), Some(&8193));
    let err = dir.model.prepare(vec![5; 8193], &EncodeOptions::default()).unwrap_err().to_string();
    assert!(err.contains("8192 positions"), "{err}");
}

#[test]
fn pooling_configs_in_either_form_are_read_and_other_modes_refused() {
    let write = |tag: &str, modules: Option<&str>, pooling_dir: &str, pooling: &str| {
        let path = fixture_with_config(NAME, tag, |_| {});
        if let Some(m) = modules {
            std::fs::write(path.join("modules.json"), m).unwrap();
        }
        std::fs::create_dir_all(path.join(pooling_dir)).unwrap();
        std::fs::write(path.join(pooling_dir).join("config.json"), pooling).unwrap();
        path
    };
    let modules = r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                      {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.sentence_transformer.modules.Pooling"}]"#;
    // sentence-transformers 6 writes `pooling_mode`; modules.json may put the module anywhere.
    let path = write("st6", Some(modules), "pool", r#"{"embedding_dimension": 16, "pooling_mode": "cls", "include_prompt": true}"#);
    let dir = ModelDir::open(&path).unwrap();
    assert_eq!((dir.pooling, dir.normalize), (Pooling::Cls, false));
    std::fs::remove_dir_all(path).unwrap();
    // Without modules.json, 1_Pooling.
    let path = write("legacy", None, "1_Pooling", r#"{"pooling_mode_mean_tokens": true}"#);
    assert_eq!(ModelDir::open(&path).unwrap().pooling, Pooling::Mean);
    std::fs::remove_dir_all(path).unwrap();
    for (tag, pooling) in
        [("max", r#"{"pooling_mode": "max"}"#), ("both", r#"{"pooling_mode_cls_token": true, "pooling_mode_max_tokens": true}"#), ("none", r#"{"pooling_mode_cls_token": false}"#)]
    {
        let path = write(tag, None, "1_Pooling", pooling);
        let err = ModelDir::open(&path).err().unwrap().to_string();
        assert!(err.contains("1_Pooling/config.json"), "{tag}: {err}");
        std::fs::remove_dir_all(path).unwrap();
    }
    let outside = modules.replace("\"pool\"", "\"../pool\"");
    let path = write("outside", Some(&outside), "pool", r#"{"pooling_mode": "cls"}"#);
    let err = ModelDir::open(&path).err().unwrap().to_string();
    assert!(err.contains("not a folder of the directory"), "{err}");
    std::fs::remove_dir_all(path).unwrap();
}
