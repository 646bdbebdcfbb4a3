//! W3C trace context (`traceparent`, https://www.w3.org/TR/trace-context/): the header that
//! ties a job's spans together as it goes coordinator -> worker -> peer, and the link from it to
//! exported traces ([`continue_trace`]).

use std::fmt;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rand::Rng;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The gRPC metadata key (HTTP header) that carries it.
pub const TRACEPARENT: &str = "traceparent";

/// `00-<trace id>-<parent span id>-<flags>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// The start of a new trace.
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        TraceParent { trace_id: nonzero(&mut rng), span_id: nonzero(&mut rng), sampled: true }
    }

    /// The same trace with a new span as the parent of what comes next.
    pub fn child(&self) -> Self {
        TraceParent { span_id: nonzero(&mut rand::rng()), ..*self }
    }

    /// Parses a version-00 header; anything malformed is `None` (the spec says to start a new
    /// trace then).
    pub fn parse(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = hex(trace)?.try_into().ok()?;
        let span_id: [u8; 8] = hex(span)?.try_into().ok()?;
        let flags: [u8; 1] = hex(flags)?.try_into().ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent { trace_id, span_id, sampled: flags[0] & 1 == 1 })
    }

    /// The trace id as 32 hex digits (what log lines carry).
    pub fn trace_id_hex(&self) -> String {
        self.trace_id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Continues the trace of `incoming` (the caller's context, if it sent one) in `span`: where
/// traces are exported (the OpenTelemetry layer, `--otlp-endpoint`), `span` becomes the child of
/// the caller's span, or the root of a new trace. Returns the context `span`'s own calls pass on:
/// its trace, with `span` as their parent (its exported id; a fresh one where nothing is
/// exported). Call it before `span` is first entered.
pub fn continue_trace(span: &tracing::Span, incoming: Option<TraceParent>) -> TraceParent {
    if let Some(parent) = incoming {
        let flags = if parent.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let remote = SpanContext::new(TraceId::from_bytes(parent.trace_id), SpanId::from_bytes(parent.span_id), flags, true, TraceState::default());
        // Without the layer (nothing exported) there is no parent to set: the ids below say so.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let exported = span.context().span().span_context().clone();
    match incoming {
        _ if exported.is_valid() => TraceParent { trace_id: exported.trace_id().to_bytes(), span_id: exported.span_id().to_bytes(), sampled: exported.is_sampled() },
        Some(parent) => parent.child(),
        None => TraceParent::new_root(),
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let span: String = self.span_id.iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "00-{}-{}-{:02x}", self.trace_id_hex(), span, u8::from(self.sampled))
    }
}

fn nonzero<const N: usize>(rng: &mut impl Rng) -> [u8; N] {
    loop {
        let bytes: [u8; N] = rng.random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_malformed_headers() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(h).unwrap();
        assert_eq!(t.to_string(), h);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.span_id, t.span_id);
        let root = TraceParent::new_root();
        assert_eq!(TraceParent::parse(&root.to_string()), Some(root));
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }
}
