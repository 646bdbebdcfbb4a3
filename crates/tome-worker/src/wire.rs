//! A job's plan and a rank's work on the internal wire (`tome.v1.Worker`), both ways. The
//! coordinator encodes with these functions and the worker decodes with them, so the two sides
//! cannot drift; decoding checks everything, since a request may come from anywhere.

use std::ops::Range;

use candle_core::{DType, Tensor};
use tome_attn::Precision;
use tome_dist::ShardPlan;
use tome_model::{LayerAttention, NativeAttention, Pooling, Shape};
use tome_net::{tensor_from_wire, tensor_to_wire};
use tome_proto::v1 as pb;

use crate::error::WorkerError;
use crate::transport::Transport;

fn invalid(msg: impl Into<String>) -> WorkerError {
    WorkerError::Invalid(msg.into())
}

fn span(r: &Range<usize>) -> pb::Span {
    pb::Span { start: r.start as u64, end: r.end as u64 }
}

fn range(s: &pb::Span, limit: usize, what: &str) -> Result<Range<usize>, WorkerError> {
    let (start, end) = (usize::try_from(s.start).unwrap_or(usize::MAX), usize::try_from(s.end).unwrap_or(usize::MAX));
    if start >= end || end > limit {
        return Err(invalid(format!("{what} {start}..{end} is empty or beyond {limit} tokens")));
    }
    Ok(start..end)
}

pub fn plan_to_wire(plan: &ShardPlan) -> (u64, Vec<pb::RankRanges>) {
    let shards = (0..plan.ranks()).map(|r| pb::RankRanges { ranges: plan.ranges(r).iter().map(span).collect() }).collect();
    (plan.len() as u64, shards)
}

/// The most tokens a plan may hold: well past a book (10^7 tokens), well short of what would
/// overflow the sizes derived from it.
pub const MAX_PLAN_TOKENS: u64 = 1 << 30;

/// A plan, checked: at least one token and at most [`MAX_PLAN_TOKENS`], at least one rank, and
/// ranges that tile the document exactly once.
pub fn plan_from_wire(tokens: u64, shards: &[pb::RankRanges]) -> Result<ShardPlan, WorkerError> {
    if tokens == 0 || tokens > MAX_PLAN_TOKENS {
        return Err(invalid(format!("plan.tokens: {tokens} is not within 1..={MAX_PLAN_TOKENS}")));
    }
    let len = usize::try_from(tokens).map_err(|_| invalid(format!("plan.tokens: {tokens} does not fit this machine")))?;
    let shards = shards.iter().map(|r| r.ranges.iter().map(|s| range(s, len, "shard range")).collect::<Result<Vec<_>, _>>()).collect::<Result<Vec<_>, _>>()?;
    ShardPlan::from_ranges(len, shards).map_err(|e| invalid(format!("plan.shards: {e}")))
}

/// The transport of a job on workers; an in-process job has no wire form.
pub fn transport_to_wire(t: Transport) -> Result<pb::Transport, WorkerError> {
    match t {
        Transport::PeerStreams => Ok(pb::Transport::PeerStreams),
        Transport::Nccl => Ok(pb::Transport::Nccl),
        Transport::InProcess => Err(WorkerError::Internal("an in-process job has no plan on the wire".into())),
    }
}

pub fn transport_from_wire(t: i32) -> Result<Transport, WorkerError> {
    match pb::Transport::try_from(t) {
        Ok(pb::Transport::PeerStreams) => Ok(Transport::PeerStreams),
        Ok(pb::Transport::Nccl) => Ok(Transport::Nccl),
        Err(_) => Err(invalid(format!("unknown transport {t} in the plan"))),
    }
}

pub fn layer_to_wire(l: LayerAttention) -> pb::AttentionOverride {
    match l {
        LayerAttention::Dense => pb::AttentionOverride { kind: pb::AttentionKind::Dense as i32, ..Default::default() },
        LayerAttention::Window { one_sided } => pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: (2 * one_sided) as u32, ..Default::default() },
        LayerAttention::BlockSparse { block, random } => {
            pb::AttentionOverride { kind: pb::AttentionKind::BlockSparse as i32, block_size: block as u32, random_blocks: random as u32, ..Default::default() }
        }
        LayerAttention::Favor { features, causal } => pb::AttentionOverride { kind: pb::AttentionKind::Favor as i32, features: features as u32, causal, ..Default::default() },
        LayerAttention::Native(native) => pb::AttentionOverride { kind: pb::AttentionKind::Native as i32, native: native.name().into(), ..Default::default() },
    }
}

pub fn layer_from_wire(a: &pb::AttentionOverride) -> Result<LayerAttention, WorkerError> {
    match pb::AttentionKind::try_from(a.kind) {
        Ok(pb::AttentionKind::Dense) => Ok(LayerAttention::Dense),
        Ok(pb::AttentionKind::Window) => LayerAttention::window(a.window as usize).map_err(|e| invalid(e.to_string())),
        Ok(pb::AttentionKind::BlockSparse) if a.block_size > 0 => Ok(LayerAttention::BlockSparse { block: a.block_size as usize, random: a.random_blocks as usize }),
        Ok(pb::AttentionKind::Favor) if a.features > 0 => Ok(LayerAttention::Favor { features: a.features as usize, causal: a.causal }),
        Ok(pb::AttentionKind::Native) => match NativeAttention::from_name(&a.native) {
            Some(native) => Ok(LayerAttention::Native(native)),
            None => Err(invalid(format!("architecture-defined attention `{}` is not one of {}", tome_server::status::echo(&a.native), NativeAttention::names()))),
        },
        _ => Err(invalid(format!("layer attention kind {} is not dense, window, block-sparse, FAVOR+ or native with its parameters", a.kind))),
    }
}

/// A plan's layers, checked against the model they run on before anything is allocated for
/// them: one per layer, each dense or a window (what a caller may choose; a window wider than
/// the document is the whole document, and is kept no wider than it), or the block-sparse or
/// FAVOR+ attention the model's config gives that layer (sizes a caller cannot choose), or an
/// architecture-defined attention (which the architecture runs from its own config).
pub fn layers_from_wire(layers: &[pb::AttentionOverride], model: &Shape, tokens: usize) -> Result<Vec<LayerAttention>, WorkerError> {
    if layers.len() != model.layer_attention.len() {
        return Err(invalid(format!("the plan has {} layers; model `{}` has {}", layers.len(), model.model_type, model.layer_attention.len())));
    }
    layers
        .iter()
        .zip(&model.layer_attention)
        .enumerate()
        .map(|(i, (wire, configured))| {
            let layer = layer_from_wire(wire)?;
            match layer {
                LayerAttention::Dense | LayerAttention::Native(_) => Ok(layer),
                LayerAttention::Window { one_sided } => Ok(LayerAttention::Window { one_sided: one_sided.min(tokens) }),
                LayerAttention::BlockSparse { .. } | LayerAttention::Favor { .. } if layer.to_string() == *configured => Ok(layer),
                LayerAttention::BlockSparse { .. } | LayerAttention::Favor { .. } => {
                    Err(invalid(format!("layer {i}: attention {layer} is not the model's ({configured}), dense or a window")))
                }
            }
        })
        .collect()
}

pub fn pooling_to_wire(p: Pooling) -> pb::Pooling {
    match p {
        Pooling::Mean => pb::Pooling::Mean,
        Pooling::Cls => pb::Pooling::Cls,
    }
}

pub fn pooling_from_wire(p: i32) -> Result<Pooling, WorkerError> {
    match pb::Pooling::try_from(p) {
        Ok(pb::Pooling::Mean | pb::Pooling::Unspecified) => Ok(Pooling::Mean),
        Ok(pb::Pooling::Cls) => Ok(Pooling::Cls),
        Err(_) => Err(invalid(format!("unknown pooling {p}"))),
    }
}

pub fn precision_to_wire(p: Precision) -> pb::Precision {
    match p {
        Precision::F32 => pb::Precision::F32,
        Precision::Bf16 => pb::Precision::Bf16,
        Precision::F16 => pb::Precision::F16,
    }
}

/// A precision on the wire (unspecified is f32); `field` names it in the refusal of a value
/// this version does not know.
pub fn precision_from_wire(p: i32, field: &str) -> Result<Precision, WorkerError> {
    match pb::Precision::try_from(p) {
        Ok(pb::Precision::Unspecified | pb::Precision::F32) => Ok(Precision::F32),
        Ok(pb::Precision::Bf16) => Ok(Precision::Bf16),
        Ok(pb::Precision::F16) => Ok(Precision::F16),
        Err(_) => Err(invalid(format!("{field}: unknown value {p}"))),
    }
}

pub fn spans_to_wire(spans: &[Range<usize>]) -> Vec<pb::Span> {
    spans.iter().map(span).collect()
}

pub fn spans_from_wire(spans: &[pb::Span], tokens: usize) -> Result<Vec<Range<usize>>, WorkerError> {
    if spans.len() > tome_model::MAX_POOL_SPANS {
        return Err(invalid(format!("pool_spans: {} spans; at most {}", spans.len(), tome_model::MAX_POOL_SPANS)));
    }
    spans.iter().map(|s| range(s, tokens, "pool span")).collect()
}

pub fn u32s_to_wire(values: &[u32]) -> Result<pb::Tensor, WorkerError> {
    let t = Tensor::from_slice(values, values.len(), &candle_core::Device::Cpu)?;
    tensor_to_wire(&t, pb::ElementType::U32).map_err(|e| WorkerError::Internal(e.to_string()))
}

pub fn u32s_from_wire(t: Option<&pb::Tensor>, what: &str) -> Result<Vec<u32>, WorkerError> {
    let t = t.ok_or_else(|| invalid(format!("{what} missing")))?;
    let t = tensor_from_wire(t).map_err(|e| invalid(format!("{what}: {e}")))?;
    if t.dtype() != DType::U32 || t.rank() != 1 {
        return Err(invalid(format!("{what} must be a u32 vector")));
    }
    Ok(t.to_vec1::<u32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tome_dist::Layout;

    #[test]
    fn plans_layers_and_spans_round_trip_and_bad_ones_are_refused() {
        for layout in [Layout::Contiguous, Layout::Zigzag] {
            let plan = ShardPlan::new(layout, 37, 4).unwrap();
            let (n, shards) = plan_to_wire(&plan);
            assert_eq!(plan_from_wire(n, &shards).unwrap(), plan);
        }
        let (n, mut shards) = plan_to_wire(&ShardPlan::new(Layout::Contiguous, 10, 2).unwrap());
        shards[1].ranges[0].end = 11;
        assert!(plan_from_wire(n, &shards).is_err());
        for l in [
            LayerAttention::Dense,
            LayerAttention::Window { one_sided: 256 },
            LayerAttention::BlockSparse { block: 64, random: 3 },
            LayerAttention::Favor { features: 16, causal: true },
        ] {
            assert_eq!(layer_from_wire(&layer_to_wire(l)).unwrap(), l);
        }
        assert!(layer_from_wire(&pb::AttentionOverride { kind: 9, window: 2, ..Default::default() }).is_err());
        assert!(layer_from_wire(&pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 3, ..Default::default() }).is_err());
        let long = pb::AttentionOverride { kind: pb::AttentionKind::Native as i32, native: "n".repeat(1 << 20), ..Default::default() };
        assert!(layer_from_wire(&long).unwrap_err().to_string().len() < 512, "a caller's attention name is repeated only in part");
        assert_eq!(spans_from_wire(&spans_to_wire(&[0..3, 2..9]), 9).unwrap(), vec![0..3, 2..9]);
        assert!(spans_from_wire(&[pb::Span { start: 4, end: 4 }], 9).is_err());
        assert_eq!(u32s_from_wire(Some(&u32s_to_wire(&[1, 5, 9]).unwrap()), "ids").unwrap(), vec![1, 5, 9]);
        assert!(u32s_from_wire(None, "ids").is_err());
    }

    #[test]
    fn malformed_plans_are_the_requests_fault_and_name_the_field() {
        let span = |start, end| pb::Span { start, end };
        let ranks = |rs: Vec<Vec<pb::Span>>| rs.into_iter().map(|ranges| pb::RankRanges { ranges }).collect::<Vec<_>>();
        let cases = [
            (0, ranks(vec![vec![]]), "plan.tokens"),
            (1 << 62, ranks(vec![vec![span(0, 1 << 62)]]), "plan.tokens"),
            (10, ranks(vec![]), "plan.shards"),
            (10, ranks(vec![vec![span(0, 4)], vec![span(5, 10)]]), "plan.shards"),
            (10, ranks(vec![vec![span(0, 6)], vec![span(4, 10)]]), "plan.shards"),
            (10, ranks(vec![vec![span(5, 10), span(0, 5)]]), "plan.shards"),
        ];
        for (tokens, shards, field) in cases {
            let err = plan_from_wire(tokens, &shards).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn precisions_round_trip_unspecified_is_f32_and_unknown_ones_name_the_field() {
        for &p in Precision::ALL {
            assert_eq!(precision_from_wire(precision_to_wire(p) as i32, "precision").unwrap(), p);
        }
        assert_eq!(precision_from_wire(pb::Precision::Unspecified as i32, "precision").unwrap(), Precision::F32);
        let err = precision_from_wire(7, "precision").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.to_string().contains("precision") && err.to_string().contains('7'), "{err}");
    }

    fn fixture(name: &str) -> tome_model::ModelDir {
        tome_model::ModelDir::open(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tome-model/tests/fixtures").join(name)).unwrap()
    }

    #[test]
    fn every_models_own_layers_pass_and_others_are_refused_before_allocating() {
        for name in [
            "bert-tiny",
            "longformer-tiny",
            "big-bird-tiny",
            "performer-tiny",
            "gpt2-tiny",
            "gpt-neo-tiny",
            "llama-tiny",
            "switch-tiny",
            "reformer-tiny",
            "transfo-xl-tiny",
            "compressive-tiny",
            "mpnet-tiny",
            "modernbert-tiny",
            "xlm-roberta-long-tiny",
        ] {
            let m = fixture(name);
            let ids = vec![1; m.model.min_tokens().max(64)];
            let doc = m.model.prepare(ids, &tome_model::EncodeOptions::default()).unwrap();
            let wire: Vec<pb::AttentionOverride> = doc.layers.iter().map(|&l| layer_to_wire(l)).collect();
            assert_eq!(layers_from_wire(&wire, &m.model.shape(), doc.len()).unwrap_or_else(|e| panic!("{name}: {e}")), doc.layers, "{name}");
        }
        let bert = fixture("bert-tiny").model.shape();
        let all = |l: LayerAttention| vec![layer_to_wire(l); bert.num_layers];
        let window = layers_from_wire(&all(LayerAttention::Window { one_sided: 1 << 30 }), &bert, 100).unwrap();
        assert_eq!(window[0], LayerAttention::Window { one_sided: 100 }, "a window past the document is the document");
        for hostile in [LayerAttention::BlockSparse { block: u32::MAX as usize, random: 3 }, LayerAttention::Favor { features: 1 << 30, causal: false }] {
            let err = layers_from_wire(&all(hostile), &bert, 100).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
            assert!(err.to_string().contains("is not the model's"), "{err}");
        }
        let err = layers_from_wire(&all(LayerAttention::Dense)[1..], &bert, 100).unwrap_err();
        assert!(err.to_string().contains("layers"), "{err}");
    }
}
