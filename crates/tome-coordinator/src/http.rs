//! HTTP beside gRPC on the coordinator's port, for the tools platform teams already run:
//!
//! - `POST /v1/embeddings`: OpenAI's embeddings API. `input` is a string or a list of strings,
//!   each processed as a document of its own (its document embedding is the vector);
//!   `encoding_format` is `float` or `base64` (little-endian f32, as OpenAI's clients decode);
//!   `dimensions`, where given, must be the model's width (tome's models are not trained to be
//!   truncated); `usage` counts the documents' tokens; tome's own `dtype` (`f32`, the default,
//!   `bf16`, or `f16` on GPU ranks) chooses the compute precision.
//! - `POST /v1/embed`: tome's own: one text, its document embedding and its chunks' (late
//!   chunking) with their token and character spans, with the options of `ProcessOptions`
//!   that apply to embeddings (`dtype` is `ProcessOptions.precision`).
//! - `GET /health` (open, for probes: 200 while jobs can run here, 503 while shutting down or
//!   while a cluster has no live worker), `GET /info`, `GET /openapi.json` (open).
//!
//! Every route goes through the same `tome.v1.Tome` implementation as gRPC calls
//! ([`Coordinator`]'s `Tome::process` and `Tome::info`): the same API keys (`authorization:
//! Bearer KEY`), limits, admission and metrics. A refusal is the gRPC status's HTTP
//! counterpart with OpenAI's error body, `{"error": {"message", "type", "code"}}`, and
//! `Retry-After` where the status says when to come back.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};
use tome_attn::Precision;
use tome_net::traceparent::TRACEPARENT;
use tome_proto::v1 as pb;
use tome_proto::v1::tome_server::Tome;
use tome_server::auth::{ApiKeys, Caller};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::metrics::{self, RefusalReason};
use crate::service::Coordinator;

/// What every route needs: the coordinator and the keys callers must send.
#[derive(Clone)]
struct Http {
    coordinator: Arc<Coordinator>,
    keys: Option<Arc<ApiKeys>>,
}

/// The HTTP routes, served beside gRPC (see the module's doc).
pub fn router(coordinator: Arc<Coordinator>, keys: Option<Arc<ApiKeys>>) -> Router {
    // A body holds at most a document of the largest size, as JSON (escapes can double it).
    let body_limit = coordinator.config().limits.max_document_bytes.saturating_mul(2).saturating_add(64 << 10);
    Router::new()
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/embed", post(embed))
        .route("/info", get(info))
        .route("/health", get(health))
        .route("/openapi.json", get(openapi))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(Http { coordinator, keys })
}

/// A refusal: the status's HTTP code and OpenAI's error body.
#[derive(Debug)]
struct Refusal(Status);

impl From<Status> for Refusal {
    fn from(s: Status) -> Self {
        Refusal(s)
    }
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal(Status::invalid_argument(message.into()))
}

/// The HTTP status that says what a gRPC status says. RESOURCE_EXHAUSTED is 429 when it is
/// a refusal for now (it carries `retry-after`) and 413 when the request is larger than this
/// server takes at all.
pub fn http_status(status: &Status) -> StatusCode {
    match status.code() {
        Code::ResourceExhausted if !tome_server::status::is_busy(status) => StatusCode::PAYLOAD_TOO_LARGE,
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        // 499, as proxies log a caller that went away.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A code's name as gRPC's status codes spell it, in lower case.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// OpenAI's `error.type` for a code.
fn error_type(code: Code) -> &'static str {
    match code {
        Code::Unauthenticated | Code::PermissionDenied => "authentication_error",
        Code::NotFound => "not_found_error",
        Code::ResourceExhausted => "rate_limit_error",
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => "invalid_request_error",
        _ => "server_error",
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let Refusal(status) = self;
        let code = status.code();
        let body = serde_json::json!({
            "error": { "message": status.message(), "type": error_type(code), "code": code_name(code) }
        });
        let mut response = (http_status(&status), Json(body)).into_response();
        if let Some(seconds) = status.metadata().get(tome_server::status::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(|v| HeaderValue::from_str(v).ok()) {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds);
        }
        response
    }
}

impl Http {
    /// The caller the request's key names (`anonymous` without keys); UNAUTHENTICATED when a
    /// key is needed and the request has none that is valid.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        match &self.keys {
            None => Ok(Caller::anonymous()),
            Some(keys) => Ok(keys.check(&MetadataMap::from_headers(headers.clone())).inspect_err(|_| metrics::refused_for(RefusalReason::Unauthenticated))?),
        }
    }

    /// Runs `request` as the gRPC `Process` call of `caller` and gathers its events; the
    /// request's trace context (`traceparent`) goes with it.
    async fn process(&self, request: pb::ProcessRequest, caller: &Caller, headers: &HeaderMap) -> Result<Processed, Refusal> {
        let mut call = tonic::Request::new(request);
        call.extensions_mut().insert(caller.clone());
        if let Some(trace) = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
            call.metadata_mut().insert(TRACEPARENT, trace);
        }
        let mut events = self.coordinator.process(call).await?.into_inner();
        let mut out = Processed::default();
        use tokio_stream::StreamExt;
        while let Some(event) = events.next().await {
            match event?.event {
                Some(pb::process_event::Event::Accepted(a)) => {
                    out.model = a.model;
                    out.tokens = a.tokens;
                }
                Some(pb::process_event::Event::Document(d)) => out.document = floats(d.embedding.as_ref())?,
                Some(pb::process_event::Event::Chunk(c)) => out.chunks.push(Chunk {
                    index: c.index,
                    tokens: c.tokens.map(|s| [s.start, s.end]),
                    chars: c.chars.map(|s| [s.start, s.end]),
                    embedding: floats(c.embedding.as_ref())?,
                }),
                Some(pb::process_event::Event::Done(d)) => out.seconds = Some(d.total_seconds),
                _ => {}
            }
        }
        if out.seconds.is_none() {
            return Err(Refusal(Status::internal("the job ended without its result")));
        }
        Ok(out)
    }
}

/// The f32 elements of an embedding on the wire.
fn floats(t: Option<&pb::Tensor>) -> Result<Vec<f32>, Refusal> {
    let t = t.ok_or_else(|| Refusal(Status::internal("an embedding without its tensor")))?;
    if t.dtype != pb::ElementType::F32 as i32 || t.data.len() % 4 != 0 {
        return Err(Refusal(Status::internal("an embedding that is not f32")));
    }
    Ok(t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

#[derive(Default)]
struct Processed {
    model: String,
    tokens: u64,
    document: Vec<f32>,
    chunks: Vec<Chunk>,
    seconds: Option<f64>,
}

#[derive(Serialize)]
struct Chunk {
    index: u32,
    tokens: Option<[u64; 2]>,
    chars: Option<[u64; 2]>,
    embedding: Vec<f32>,
}

/// OpenAI's `input`: one string or several (token arrays are not taken).
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    input: Input,
    #[serde(default)]
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    /// tome's own: the compute precision, `f32` (default), `bf16`, or `f16` (GPU ranks).
    #[serde(default)]
    dtype: Option<String>,
    /// Accepted and ignored, as OpenAI does for attribution.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// A request's `dtype` as `ProcessOptions.precision`; `field` names it in the refusal.
fn precision(dtype: Option<&str>, field: &str) -> Result<pb::Precision, Refusal> {
    match dtype {
        None => Ok(pb::Precision::Unspecified),
        Some(d) => d.parse::<Precision>().map(tome_worker::wire::precision_to_wire).map_err(|e| invalid(format!("{field}: {e}"))),
    }
}

/// Documents one `/v1/embeddings` call may hold.
const MAX_INPUTS: usize = 2048;

/// The body, or a refusal in JSON when it is over the limit or cannot be read.
fn body(read: Result<Bytes, BytesRejection>) -> Result<Bytes, Refusal> {
    read.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => Refusal(Status::resource_exhausted("the request body is larger than this server takes (twice --max-document-bytes)")),
        _ => invalid(format!("the request body: {}", e.body_text())),
    })
}

async fn openai_embeddings(State(http): State<Http>, headers: HeaderMap, read: Result<Bytes, BytesRejection>) -> Result<Response, Refusal> {
    let caller = http.caller(&headers)?;
    let body = body(read)?;
    let request: EmbeddingsRequest = serde_json::from_slice(&body).map_err(|e| invalid(format!("the request body: {e}")))?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(invalid(format!("encoding_format {other:?}: `float` or `base64`"))),
    };
    let inputs = match request.input {
        Input::One(s) => vec![s],
        Input::Many(v) => v,
    };
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(invalid(format!("input holds {} documents; a call takes 1 to {MAX_INPUTS}", inputs.len())));
    }
    let precision = precision(request.dtype.as_deref(), "dtype")?;
    let options = pb::ProcessOptions { outputs: vec![pb::Output::DocumentEmbedding as i32], precision: precision as i32, ..Default::default() };
    let (mut data, mut tokens, mut model) = (Vec::with_capacity(inputs.len()), 0, String::new());
    for (index, text) in inputs.into_iter().enumerate() {
        let process = pb::ProcessRequest { model: request.model.clone(), input: Some(pb::process_request::Input::Text(text.into_bytes())), options: Some(options.clone()) };
        let out = http
            .process(process, &caller, &headers)
            .await
            .map_err(|Refusal(s)| Refusal(Status::with_metadata(s.code(), format!("input[{index}]: {}", s.message()), s.metadata().clone())))?;
        if let Some(d) = request.dimensions.filter(|&d| d != out.document.len()) {
            return Err(invalid(format!("dimensions {d}: model `{}` gives {}-dimensional embeddings and is not trained to be truncated", out.model, out.document.len())));
        }
        let embedding = if base64 {
            let bytes: Vec<u8> = out.document.iter().flat_map(|x| x.to_le_bytes()).collect();
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            serde_json::json!(out.document)
        };
        data.push(serde_json::json!({ "object": "embedding", "index": index, "embedding": embedding }));
        tokens += out.tokens;
        model = out.model;
    }
    Ok(Json(serde_json::json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens },
    }))
    .into_response())
}

/// `/v1/embed`'s options: those of `ProcessOptions` that apply to embeddings, by name.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EmbedOptions {
    /// Chunk embeddings too (default true).
    chunks: Option<bool>,
    chunk_tokens: Option<u32>,
    /// `mean` or `cls`; default: the model's.
    pooling: Option<String>,
    normalize: Option<bool>,
    /// `dense` or `window:W`.
    attention: Option<String>,
    /// `refuse` (default) or `tile`.
    positions: Option<String>,
    ranks: Option<u32>,
    #[serde(default)]
    global_tokens: Vec<u64>,
    /// The compute precision: `f32` (default), `bf16`, or `f16` (GPU ranks).
    dtype: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedRequest {
    text: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    options: EmbedOptions,
}

impl EmbedOptions {
    fn to_proto(&self) -> Result<pb::ProcessOptions, Refusal> {
        let mut outputs = vec![pb::Output::DocumentEmbedding as i32];
        if self.chunks.unwrap_or(true) {
            outputs.push(pb::Output::ChunkEmbeddings as i32);
        }
        let pooling = match self.pooling.as_deref() {
            None => pb::Pooling::Unspecified,
            Some("mean") => pb::Pooling::Mean,
            Some("cls") => pb::Pooling::Cls,
            Some(p) => return Err(invalid(format!("options.pooling {p:?}: `mean` or `cls`"))),
        };
        let attention = match self.attention.as_deref() {
            None => None,
            Some("dense") => Some(pb::AttentionOverride { kind: pb::AttentionKind::Dense as i32, ..Default::default() }),
            Some(a) => {
                let window = a.strip_prefix("window:").and_then(|w| w.parse().ok()).ok_or_else(|| invalid(format!("options.attention {a:?}: `dense` or `window:W`")))?;
                Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window, ..Default::default() })
            }
        };
        let position_extension = match self.positions.as_deref() {
            None | Some("refuse") => pb::PositionExtension::Unspecified,
            Some("tile") => pb::PositionExtension::Tile,
            Some(p) => return Err(invalid(format!("options.positions {p:?}: `refuse` or `tile`"))),
        };
        Ok(pb::ProcessOptions {
            outputs,
            pooling: pooling as i32,
            normalize: self.normalize,
            chunks: self.chunk_tokens.map(|n| pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::TokensPerChunk(n)) }),
            attention,
            position_extension: position_extension as i32,
            ranks: self.ranks.unwrap_or(0),
            global_tokens: self.global_tokens.clone(),
            precision: precision(self.dtype.as_deref(), "options.dtype")? as i32,
            ..Default::default()
        })
    }
}

async fn embed(State(http): State<Http>, headers: HeaderMap, read: Result<Bytes, BytesRejection>) -> Result<Response, Refusal> {
    let caller = http.caller(&headers)?;
    let body = body(read)?;
    let request: EmbedRequest = serde_json::from_slice(&body).map_err(|e| invalid(format!("the request body: {e}")))?;
    let options = request.options.to_proto()?;
    let process = pb::ProcessRequest { model: request.model, input: Some(pb::process_request::Input::Text(request.text.into_bytes())), options: Some(options) };
    let out = http.process(process, &caller, &headers).await?;
    Ok(Json(serde_json::json!({
        "model": out.model,
        "tokens": out.tokens,
        "document_embedding": out.document,
        "chunks": out.chunks,
        "seconds": out.seconds,
    }))
    .into_response())
}

async fn info(State(http): State<Http>, headers: HeaderMap) -> Result<Response, Refusal> {
    let caller = http.caller(&headers)?;
    let mut call = tonic::Request::new(pb::InfoRequest {});
    call.extensions_mut().insert(caller);
    let info = http.coordinator.info(call).await?.into_inner();
    let limits = info.limits.unwrap_or_default();
    Ok(Json(serde_json::json!({
        "version": info.version,
        "backend": info.backend,
        "default_ranks": info.default_ranks,
        "workers": info.workers,
        "bf16_kernel": info.bf16_kernel,
        "gpus": info.gpus.iter().map(|g| serde_json::json!({
            "index": g.index, "name": g.name, "memory_bytes": g.memory_bytes, "compute_capability": g.compute_capability,
        })).collect::<Vec<_>>(),
        "gpus_missing": info.gpus_missing,
        "limits": {
            "max_document_tokens": limits.max_document_tokens,
            "max_document_bytes": limits.max_document_bytes,
            "max_ranks": limits.max_ranks,
            "max_concurrent_jobs": limits.max_concurrent_jobs,
            "max_tokens_in_flight": limits.max_tokens_in_flight,
            "max_queued_requests": limits.max_queued_requests,
            "max_queued_tokens": limits.max_queued_tokens,
            "max_jobs_per_caller": limits.max_jobs_per_caller,
        },
        "models": info.models.iter().map(|m| serde_json::json!({
            "name": m.name, "architecture": m.architecture, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
            "max_positions": m.max_positions, "default_pooling": m.default_pooling, "layer_attention": m.layer_attention,
            "causal": m.causal, "precisions": m.precisions, "gpu_precisions": m.gpu_precisions,
        })).collect::<Vec<_>>(),
    }))
    .into_response())
}

async fn health(State(http): State<Http>) -> Response {
    if http.coordinator.is_ready() {
        (StatusCode::OK, Json(serde_json::json!({ "status": "SERVING" }))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "status": "NOT_SERVING" }))).into_response()
    }
}

async fn openapi() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The routes, described (OpenAPI 3.0).
const OPENAPI: &str = include_str!("openapi.json");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_http_status_and_the_openapi_document_parses() {
        let of = |code| http_status(&Status::new(code, ""));
        assert_eq!(of(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(of(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(of(Code::ResourceExhausted), StatusCode::PAYLOAD_TOO_LARGE, "larger than ever taken");
        assert_eq!(http_status(&tome_server::status::busy("busy")), StatusCode::TOO_MANY_REQUESTS, "refused for now");
        assert_eq!(of(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(of(Code::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(of(Code::Internal), StatusCode::INTERNAL_SERVER_ERROR);
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        for path in ["/v1/embeddings", "/v1/embed", "/info", "/health"] {
            assert!(doc["paths"].get(path).is_some(), "{path} is not described");
        }
    }

    #[test]
    fn embed_options_map_to_process_options_and_bad_ones_are_named() {
        let o: EmbedOptions = serde_json::from_str(r#"{"chunks": false, "attention": "window:64", "positions": "tile", "pooling": "cls", "ranks": 3}"#).unwrap();
        let p = o.to_proto().unwrap();
        assert_eq!(p.outputs, vec![pb::Output::DocumentEmbedding as i32]);
        assert_eq!(p.attention.unwrap().window, 64);
        assert_eq!(p.position_extension, pb::PositionExtension::Tile as i32);
        assert_eq!((p.pooling, p.ranks), (pb::Pooling::Cls as i32, 3));
        assert_eq!(p.precision, pb::Precision::Unspecified as i32, "f32 unless asked");
        let bf16: EmbedOptions = serde_json::from_str(r#"{"dtype": "bf16"}"#).unwrap();
        assert_eq!(bf16.to_proto().unwrap().precision, pb::Precision::Bf16 as i32);
        for (json, field) in [
            (r#"{"attention": "sparse"}"#, "options.attention"),
            (r#"{"positions": "stretch"}"#, "options.positions"),
            (r#"{"pooling": "max"}"#, "options.pooling"),
            (r#"{"dtype": "f64"}"#, "options.dtype"),
        ] {
            let o: EmbedOptions = serde_json::from_str(json).unwrap();
            let Err(Refusal(s)) = o.to_proto() else { panic!("{json} was accepted") };
            assert!(s.code() == Code::InvalidArgument && s.message().contains(field), "{s:?}");
        }
        let Err(Refusal(s)) = precision(Some("f64"), "dtype") else { panic!("f64 was accepted") };
        assert!(s.code() == Code::InvalidArgument && s.message() == "dtype: unknown dtype `f64`; one of f32, bf16, f16", "{s:?}");
        assert!(serde_json::from_str::<EmbedOptions>(r#"{"chunk_size": 3}"#).is_err(), "unknown options are refused");
    }
}
