//! From the wire's request options to a checked job description. Unknown enum values are
//! refused (never silently read as a default).

use std::ops::Range;

use tome_attn::Precision;
use tome_dist::Layout;
use tome_model::{EncodeOptions, LayerAttention, Pooling, PositionExtension};
use tome_proto::v1 as pb;

use crate::error::CoordError;

/// A request's options, checked.
#[derive(Debug)]
pub(crate) struct JobOptions {
    pub document: bool,
    pub chunks: bool,
    pub hidden: bool,
    pub log_probs: bool,
    pub pooling: Option<Pooling>,
    /// `None`: as the model's modules.json says.
    pub normalize: Option<bool>,
    pub chunking: Chunking,
    pub encode: EncodeOptions,
    pub ranks: Option<usize>,
    pub layout: Layout,
    pub hidden_dtype: pb::ElementType,
}

#[derive(Debug)]
pub(crate) enum Chunking {
    Default,
    Every(usize),
    Spans(Vec<Range<usize>>),
}

fn known<T: TryFrom<i32>>(value: i32, field: &str) -> Result<T, CoordError> {
    T::try_from(value).map_err(|_| CoordError::Invalid(format!("options.{field}: unknown value {value}")))
}

pub(crate) fn parse_options(opts: Option<&pb::ProcessOptions>) -> Result<JobOptions, CoordError> {
    let default = pb::ProcessOptions::default();
    let o = opts.unwrap_or(&default);
    let (mut document, mut chunks, mut hidden, mut log_probs) = (false, false, false, false);
    for &out in &o.outputs {
        match known::<pb::Output>(out, "outputs")? {
            pb::Output::DocumentEmbedding => document = true,
            pb::Output::ChunkEmbeddings => chunks = true,
            pb::Output::HiddenStates => hidden = true,
            pb::Output::LogProbs => log_probs = true,
            pb::Output::Unspecified => return Err(CoordError::Invalid("options.outputs: OUTPUT_UNSPECIFIED is not an output".into())),
        }
    }
    if o.outputs.is_empty() {
        (document, chunks) = (true, true);
    }
    let pooling = match known::<pb::Pooling>(o.pooling, "pooling")? {
        pb::Pooling::Unspecified => None,
        pb::Pooling::Mean => Some(Pooling::Mean),
        pb::Pooling::Cls => Some(Pooling::Cls),
    };
    let chunking = match o.chunks.as_ref().and_then(|c| c.spec.as_ref()) {
        None => Chunking::Default,
        Some(pb::chunk_spec::Spec::TokensPerChunk(0)) => return Err(CoordError::Invalid("options.chunks.tokens_per_chunk must be positive".into())),
        Some(pb::chunk_spec::Spec::TokensPerChunk(n)) => Chunking::Every(*n as usize),
        Some(pb::chunk_spec::Spec::Spans(s)) => Chunking::Spans(s.spans.iter().map(|s| s.start as usize..s.end as usize).collect()),
    };
    let attention = match o.attention.as_ref() {
        None => None,
        Some(a) => match known::<pb::AttentionKind>(a.kind, "attention.kind")? {
            pb::AttentionKind::Unspecified => None,
            pb::AttentionKind::Dense => Some(LayerAttention::Dense),
            pb::AttentionKind::Window => {
                Some(LayerAttention::window(a.window as usize).map_err(|_| CoordError::Invalid(format!("options.attention.window: {} must be even and positive", a.window)))?)
            }
            pb::AttentionKind::BlockSparse | pb::AttentionKind::Favor | pb::AttentionKind::Native => {
                return Err(CoordError::Invalid("options.attention: block-sparse, FAVOR+ and architecture-defined attention come from a checkpoint's config, not a request".into()))
            }
        },
    };
    let position_extension = match known::<pb::PositionExtension>(o.position_extension, "position_extension")? {
        pb::PositionExtension::Unspecified => PositionExtension::Refuse,
        pb::PositionExtension::Tile => PositionExtension::Tile,
    };
    let layout = match known::<pb::Layout>(o.layout, "layout")? {
        pb::Layout::Unspecified | pb::Layout::Contiguous => Layout::Contiguous,
        pb::Layout::Zigzag => Layout::Zigzag,
    };
    let hidden_dtype = match known::<pb::ElementType>(o.hidden_dtype, "hidden_dtype")? {
        pb::ElementType::I64 | pb::ElementType::U8 | pb::ElementType::U32 => {
            return Err(CoordError::Invalid("options.hidden_dtype: hidden states are floating point (f32, f16 or bf16)".into()))
        }
        other => other,
    };
    let precision = match known::<pb::Precision>(o.precision, "precision")? {
        pb::Precision::Unspecified | pb::Precision::F32 => Precision::F32,
        pb::Precision::Bf16 => Precision::Bf16,
        pb::Precision::F16 => Precision::F16,
    };
    Ok(JobOptions {
        document,
        chunks,
        hidden,
        log_probs,
        pooling,
        normalize: o.normalize,
        chunking,
        encode: EncodeOptions {
            attention,
            position_extension,
            global_tokens: o.global_tokens.iter().map(|&g| g as usize).collect(),
            output_layer: o.hidden_layer.map(|k| k as usize),
            segment_len: (o.segment_len > 0).then_some(o.segment_len as usize),
            precision,
        },
        ranks: (o.ranks > 0).then_some(o.ranks as usize),
        layout,
        hidden_dtype,
    })
}

/// The chunk spans of a document of `tokens` tokens, checked.
pub(crate) fn chunk_spans(chunking: &Chunking, tokens: usize, default_chunk: usize) -> Result<Vec<Range<usize>>, CoordError> {
    // One place is the document's own span.
    let most = tome_model::MAX_POOL_SPANS - 1;
    let too_many = |n: usize| CoordError::Invalid(format!("options.chunks: {n} chunks; at most {most}"));
    let every = |n: usize| {
        let count = tokens.div_ceil(n);
        if count > most {
            return Err(too_many(count));
        }
        Ok((0..tokens).step_by(n).map(|s| s..(s + n).min(tokens)).collect())
    };
    match chunking {
        Chunking::Default => every(default_chunk),
        Chunking::Every(n) => every(*n),
        Chunking::Spans(spans) if spans.len() > most => Err(too_many(spans.len())),
        Chunking::Spans(spans) => {
            if let Some(bad) = spans.iter().find(|s| s.start >= s.end || s.end > tokens) {
                return Err(CoordError::Invalid(format!("options.chunks.spans: span {}..{} is empty or outside the document of {tokens} tokens", bad.start, bad.end)));
            }
            Ok(spans.clone())
        }
    }
}

/// Text from the wire, checked: not empty, within the byte limit, valid UTF-8.
pub(crate) fn document_text(bytes: &[u8], max_bytes: usize) -> Result<&str, CoordError> {
    if bytes.len() > max_bytes {
        return Err(CoordError::Exhausted(format!("the document has {} bytes; this server accepts at most {max_bytes}", bytes.len())));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| CoordError::Invalid(format!("the text is not valid UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(CoordError::Invalid("the document is empty".into()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        let o = parse_options(None).unwrap();
        assert!(o.document && o.chunks && !o.hidden);
        let bad = pb::ProcessOptions { pooling: 9, ..Default::default() };
        assert!(parse_options(Some(&bad)).unwrap_err().to_string().contains("pooling: unknown value 9"));
        let odd = pb::ProcessOptions { attention: Some(pb::AttentionOverride { kind: 2, window: 7, ..Default::default() }), ..Default::default() };
        assert!(parse_options(Some(&odd)).is_err());
        assert_eq!(chunk_spans(&Chunking::Every(4), 10, 256).unwrap(), vec![0..4, 4..8, 8..10]);
        #[allow(clippy::single_range_in_vec_init)] // one span, past the document's end
        let past_the_end = Chunking::Spans(vec![3..12]);
        assert!(chunk_spans(&past_the_end, 10, 256).is_err());
        assert!(document_text(b"\xff\xfe", 100).unwrap_err().to_string().contains("UTF-8"));
        assert!(document_text(b"  \n", 100).is_err());
        assert!(matches!(document_text(b"hello", 3), Err(CoordError::Exhausted(_))));
        for dtype in [pb::ElementType::I64, pb::ElementType::U8, pb::ElementType::U32] {
            let ints = pb::ProcessOptions { hidden_dtype: dtype as i32, ..Default::default() };
            assert!(matches!(parse_options(Some(&ints)), Err(CoordError::Invalid(m)) if m.contains("floating point")), "{dtype:?} is refused before the job runs");
        }
    }

    #[test]
    fn the_precision_is_f32_unless_asked_and_unknown_values_name_the_field() {
        assert_eq!(parse_options(None).unwrap().encode.precision, Precision::F32);
        for (wire, precision) in
            [(pb::Precision::Unspecified, Precision::F32), (pb::Precision::F32, Precision::F32), (pb::Precision::Bf16, Precision::Bf16), (pb::Precision::F16, Precision::F16)]
        {
            let o = pb::ProcessOptions { precision: wire as i32, ..Default::default() };
            assert_eq!(parse_options(Some(&o)).unwrap().encode.precision, precision);
        }
        let bad = pb::ProcessOptions { precision: 7, ..Default::default() };
        assert!(matches!(parse_options(Some(&bad)), Err(CoordError::Invalid(m)) if m == "options.precision: unknown value 7"));
    }

    #[test]
    fn the_chunks_a_job_pools_are_bounded_before_any_is_made() {
        let most = tome_model::MAX_POOL_SPANS - 1;
        assert_eq!(chunk_spans(&Chunking::Every(1), most, 256).unwrap().len(), most);
        let err = chunk_spans(&Chunking::Every(1), most + 1, 256).unwrap_err();
        assert!(matches!(&err, CoordError::Invalid(m) if m.contains(&format!("{} chunks; at most {most}", most + 1))), "{err}");
        let err = chunk_spans(&Chunking::Every(1), 4_000_000_000, 256).unwrap_err();
        assert!(err.to_string().contains("4000000000 chunks"), "{err}");
        assert!(chunk_spans(&Chunking::Spans(vec![0..1; most + 1]), 10, 256).is_err());
    }
}
