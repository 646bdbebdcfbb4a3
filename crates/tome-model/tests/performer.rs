//! tome's Performer encoder (own schema, docs/models/performer.md) against its reference: BERT
//! layers with performer-pytorch's FastAttention (FAVOR+) computed in PyTorch (fixture
//! `performer-tiny` from scripts/gen_fixtures.py), with the projections read from the
//! checkpoint, on 1..4 ranks in both layouts.

mod common;

use common::{assert_hidden_states_match, fixture, input_ids};
use tome_model::{EncodeOptions, LayerAttention, ModelDir};

#[test]
fn favor_layers_match_performer_pytorch_on_any_number_of_ranks() {
    let dir = ModelDir::open(&fixture("performer-tiny")).unwrap();
    let doc = dir.model.prepare(input_ids("performer-tiny"), &EncodeOptions::default()).unwrap();
    assert_eq!(doc.layers[0], LayerAttention::Favor { features: 16, causal: false });
    assert_eq!(dir.model.shape().layer_attention[0], "favor:16");
    assert_hidden_states_match("performer-tiny", &dir, &doc);
}
