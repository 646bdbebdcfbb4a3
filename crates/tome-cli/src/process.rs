//! `tome process` and `tome info`: the same public API whether the coordinator is remote or
//! embedded — the embedded one is called through its service trait, with no socket in between.

use std::pin::Pin;
use std::sync::Arc;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio_stream::{Stream, StreamExt};
use tome_coordinator::Coordinator;
use tome_net::tensor_from_wire;
use tome_proto::v1 as pb;
use tome_proto::v1::tome_client::TomeClient;
use tome_proto::v1::tome_server::Tome;
use tome_server::auth::BearerToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Request;

use crate::args::{ClientTlsArgs, EmbeddedArgs, Emit, InfoArgs, JobFlags, LayoutArg, PoolingArg, PositionsArg, ProcessArgs};
use crate::embedded;
use crate::outputs::{read_ids_npy, Collected};

pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ProcessEvent, tonic::Status>> + Send>>;

fn attention(spec: &str) -> anyhow::Result<pb::AttentionOverride> {
    match spec.split_once(':') {
        None if spec == "dense" => Ok(pb::AttentionOverride { kind: pb::AttentionKind::Dense as i32, ..Default::default() }),
        Some(("window", w)) => {
            let window = w.parse().with_context(|| format!("--attention window:{w}: not a number"))?;
            Ok(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window, ..Default::default() })
        }
        _ => bail!("--attention {spec}: expected `dense` or `window:W`"),
    }
}

fn request(args: &ProcessArgs) -> anyhow::Result<pb::ProcessRequest> {
    let input = match (&args.file, &args.ids) {
        (_, Some(ids)) => pb::process_request::Input::TokenIds(pb::TokenIds { ids: read_ids_npy(ids)? }),
        (Some(file), None) => pb::process_request::Input::Text(std::fs::read(file).with_context(|| format!("reading {}", file.display()))?),
        (None, None) => bail!("give a text file or --ids FILE.npy"),
    };
    Ok(pb::ProcessRequest { model: args.job.model_name.clone(), input: Some(input), options: Some(options(&args.job, args.embedded.ranks)?) })
}

/// The request options `flags` ask for, on `ranks` ranks.
pub fn options(args: &JobFlags, ranks: usize) -> anyhow::Result<pb::ProcessOptions> {
    let outputs = args
        .emit
        .iter()
        .map(|e| match e {
            Emit::Document => pb::Output::DocumentEmbedding,
            Emit::Chunks => pb::Output::ChunkEmbeddings,
            Emit::HiddenStates => pb::Output::HiddenStates,
            Emit::Logprobs => pb::Output::LogProbs,
        } as i32)
        .collect();
    let options = pb::ProcessOptions {
        outputs,
        pooling: match args.pooling {
            None => pb::Pooling::Unspecified,
            Some(PoolingArg::Mean) => pb::Pooling::Mean,
            Some(PoolingArg::Cls) => pb::Pooling::Cls,
        } as i32,
        normalize: args.normalize,
        chunks: args.chunk_tokens.map(|n| pb::ChunkSpec { spec: Some(pb::chunk_spec::Spec::TokensPerChunk(n)) }),
        attention: args.attention.as_deref().map(attention).transpose()?,
        position_extension: match args.positions {
            PositionsArg::Refuse => pb::PositionExtension::Unspecified,
            PositionsArg::Tile => pb::PositionExtension::Tile,
        } as i32,
        ranks: ranks as u32,
        layout: match args.layout {
            LayoutArg::Contiguous => pb::Layout::Contiguous,
            LayoutArg::Zigzag => pb::Layout::Zigzag,
        } as i32,
        global_tokens: args.global_tokens.clone(),
        hidden_dtype: pb::ElementType::F32 as i32,
        hidden_layer: args.hidden_layer,
        segment_len: args.segment_len.unwrap_or(0),
        precision: tome_worker::wire::precision_to_wire(args.dtype) as i32,
    };
    Ok(options)
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

/// Texts above this size go to a remote coordinator as an upload (ProcessUpload), in pieces of
/// this size, so no message nears the server's limit.
const UPLOAD_PIECE_BYTES: usize = 1 << 20;
const UPLOAD_ABOVE_BYTES: usize = 4 << 20;

/// The request as an upload: the request without its text first, then the text in pieces.
fn upload(mut req: pb::ProcessRequest) -> Vec<pb::UploadChunk> {
    let text = match req.input.take() {
        Some(pb::process_request::Input::Text(t)) => t,
        other => {
            req.input = other;
            Vec::new()
        }
    };
    let mut parts = vec![pb::UploadChunk { part: Some(pb::upload_chunk::Part::Request(req)) }];
    parts.extend(text.chunks(UPLOAD_PIECE_BYTES).map(|c| pb::UploadChunk { part: Some(pb::upload_chunk::Part::Text(c.to_vec())) }));
    parts
}

/// Where requests go: a coordinator over gRPC, or the embedded one in this process (called
/// through its service trait, with no socket in between).
#[derive(Clone)]
pub enum Target {
    Remote(Client),
    Embedded(Arc<Coordinator>),
}

/// A coordinator's client that sends the caller's API key with every call.
pub type Client = TomeClient<InterceptedService<Channel, BearerToken>>;

/// A client of the coordinator at `addr` (`host:port`; over TLS with `tls.tls_ca`; with the API
/// key `tls.api_key`).
pub async fn connect(addr: &str, tls: &ClientTlsArgs) -> anyhow::Result<Client> {
    let config = tome_server::tls::client_config(&tls.files())?;
    let channel = tome_server::tls::endpoint(addr, config.as_ref())?.connect().await.with_context(|| format!("connecting to {addr}"))?;
    Ok(TomeClient::with_interceptor(channel, tls.bearer()?))
}

impl Target {
    /// `coordinator` if given (over TLS as `tls` says), else the embedded default built from
    /// `embedded`.
    pub async fn new(coordinator: Option<&str>, tls: &ClientTlsArgs, embedded: &EmbeddedArgs) -> anyhow::Result<Self> {
        Ok(match coordinator {
            Some(addr) => {
                let client = connect(addr, tls).await?.max_decoding_message_size(embedded.max_message_bytes).max_encoding_message_size(embedded.max_message_bytes);
                Target::Remote(client)
            }
            None => Target::Embedded(Arc::new(embedded::coordinator(embedded)?)),
        })
    }

    /// Starts processing `req`; texts above 4 MiB go to a remote coordinator as an upload.
    pub async fn open(&self, req: pb::ProcessRequest) -> Result<EventStream, tonic::Status> {
        match self {
            Target::Remote(client) => {
                let mut client = client.clone();
                let large = matches!(&req.input, Some(pb::process_request::Input::Text(t)) if t.len() > UPLOAD_ABOVE_BYTES);
                if large {
                    let parts = tokio_stream::iter(upload(req));
                    Ok(Box::pin(client.process_upload(Request::new(parts)).await?.into_inner()))
                } else {
                    Ok(Box::pin(client.process(Request::new(req)).await?.into_inner()))
                }
            }
            Target::Embedded(coordinator) => Ok(coordinator.process(Request::new(req)).await?.into_inner()),
        }
    }
}

pub async fn process(args: ProcessArgs) -> anyhow::Result<()> {
    let req = request(&args)?;
    let hidden_layer = req.options.as_ref().and_then(|o| o.hidden_layer);
    let target = Target::new(args.coordinator.as_deref(), &args.tls, &args.embedded).await?;
    let stream = target.open(req).await.map_err(status_error)?;
    let bar = if args.quiet { ProgressBar::hidden() } else { layer_bar() };
    let mut collected = collect(stream, &bar).await.map_err(status_error)?;
    collected.hidden_layer = hidden_layer;
    let files = collected.write(&args.out)?;
    let done = collected.done.clone().unwrap_or_default();
    print_line(
        &json!({"out": args.out, "files": files, "tokens": done["tokens"], "compute_seconds": done["compute_seconds"],
               "total_seconds": done["total_seconds"], "perplexity": done["perplexity"]})
        .to_string(),
    )
}

/// Writes `text` and a newline to stdout. A reader that has closed its end (`tome info | head
/// -1`) has all it wanted: that ends the output quietly rather than as an error or a panic.
pub fn print_line(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// A bar for one document's layers.
pub fn layer_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar.set_style(ProgressStyle::with_template("{spinner} {prefix} {msg} [{bar:30}] layer {pos}/{len} {elapsed_precise}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    bar
}

/// Reads a Process stream to its end; `bar` follows the layers. A stream that fails, or ends
/// before Done, is an error with the server's code.
pub async fn collect(mut stream: EventStream, bar: &ProgressBar) -> Result<Collected, tonic::Status> {
    let bad = |e: anyhow::Error| tonic::Status::internal(format!("a malformed event: {e:#}"));
    let mut c = Collected::default();
    while let Some(ev) = stream.next().await {
        let Some(ev) = ev?.event else { continue };
        match ev {
            pb::process_event::Event::Accepted(a) => {
                bar.set_message(format!("{} tokens on {} ranks", a.tokens, a.ranks));
                bar.set_length(a.layer_attention.len() as u64);
                c.accepted = Some(json!({
                    "job_id": a.job_id, "model": a.model, "tokens": a.tokens, "ranks": a.ranks,
                    "shard_tokens": a.shard_tokens, "layer_attention": a.layer_attention,
                }));
            }
            pb::process_event::Event::Progress(p) => bar.set_position(p.layers_done as u64),
            pb::process_event::Event::Chunk(ch) => {
                let emb = vector(ch.embedding.as_ref()).map_err(bad)?;
                c.width = emb.len();
                c.chunks.extend(emb);
                let span = |s: Option<pb::Span>| s.map_or([-1, -1], |s| [s.start as i64, s.end as i64]);
                c.chunk_tokens.push(span(ch.tokens));
                c.chunk_chars.push(span(ch.chars));
            }
            pb::process_event::Event::Document(d) => {
                let emb = vector(d.embedding.as_ref()).map_err(bad)?;
                c.width = emb.len();
                c.document = Some(emb);
            }
            pb::process_event::Event::HiddenStates(h) => {
                let rows = hidden_rows(&h).map_err(bad)?;
                if h.token_start as usize != c.hidden_rows {
                    return Err(bad(anyhow::anyhow!("hidden states out of order: rows from {} after {}", h.token_start, c.hidden_rows)));
                }
                c.hidden_rows += rows.0;
                c.hidden.extend(rows.1);
            }
            pb::process_event::Event::LogProbs(l) => {
                if l.token_start as usize != c.log_probs.len() {
                    return Err(bad(anyhow::anyhow!("log-probs out of order: from {} after {}", l.token_start, c.log_probs.len())));
                }
                c.log_probs.extend(vector(l.values.as_ref()).map_err(bad)?);
            }
            pb::process_event::Event::Done(d) => {
                bar.finish_and_clear();
                c.done = Some(json!({
                    "tokens": d.tokens, "tokenize_seconds": d.tokenize_seconds, "compute_seconds": d.compute_seconds,
                    "total_seconds": d.total_seconds, "bytes_exchanged": d.bytes_exchanged,
                    "wire_bytes_exchanged": d.wire_bytes_exchanged, "perplexity": d.perplexity,
                }));
            }
        }
    }
    if c.done.is_none() {
        return Err(tonic::Status::unavailable("the stream ended before the job was done"));
    }
    Ok(c)
}

/// A hidden-states message as (rows, f32 values).
fn hidden_rows(h: &pb::HiddenStates) -> anyhow::Result<(usize, Vec<f32>)> {
    let t = tensor_from_wire(h.states.as_ref().context("hidden states without a tensor")?)?;
    let t = t.to_dtype(candle_core::DType::F32)?;
    Ok((t.dim(0)?, t.flatten_all()?.to_vec1::<f32>()?))
}

fn vector(t: Option<&pb::Tensor>) -> anyhow::Result<Vec<f32>> {
    let t = tensor_from_wire(t.context("an embedding without a tensor")?)?;
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// GPUs as `tome info` and `/info` print them.
fn gpus_json(gpus: &[pb::GpuDevice]) -> serde_json::Value {
    gpus.iter().map(|g| json!({"index": g.index, "name": g.name, "memory_bytes": g.memory_bytes, "compute_capability": g.compute_capability})).collect()
}

pub async fn info(args: InfoArgs) -> anyhow::Result<()> {
    let resp = match &args.coordinator {
        Some(addr) => connect(addr, &args.tls).await?.info(pb::InfoRequest {}).await.map_err(status_error)?.into_inner(),
        None => embedded::coordinator(&args.embedded)?.info(Request::new(pb::InfoRequest {})).await.map_err(status_error)?.into_inner(),
    };
    let models: Vec<_> = resp
        .models
        .iter()
        .map(|m| {
            json!({"name": m.name, "architecture": m.architecture, "hidden_size": m.hidden_size, "num_layers": m.num_layers,
                   "max_positions": m.max_positions, "default_pooling": m.default_pooling, "layer_attention": m.layer_attention,
                   "has_tokenizer": m.has_tokenizer, "causal": m.causal, "precisions": m.precisions, "gpu_precisions": m.gpu_precisions})
        })
        .collect();
    let limits = resp.limits.unwrap_or_default();
    print_line(&serde_json::to_string_pretty(&json!({"version": resp.version, "backend": resp.backend, "workers": resp.workers,
        "bf16_kernel": resp.bf16_kernel, "gpus": gpus_json(&resp.gpus), "gpus_missing": resp.gpus_missing,
        "default_ranks": resp.default_ranks, "models": models,
        "limits": {"max_document_tokens": limits.max_document_tokens, "max_document_bytes": limits.max_document_bytes,
                   "max_ranks": limits.max_ranks, "max_concurrent_jobs": limits.max_concurrent_jobs,
                   "max_tokens_in_flight": limits.max_tokens_in_flight, "max_queued_requests": limits.max_queued_requests,
                   "max_queued_tokens": limits.max_queued_tokens, "max_jobs_per_caller": limits.max_jobs_per_caller}}))?)
}
