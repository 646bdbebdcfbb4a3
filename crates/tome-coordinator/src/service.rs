//! `tome.v1.Tome`: admission, tokenization, planning, dispatch and the ordered output stream.
//!
//! The ranks of a job run either as threads of this process (the embedded backend) or on worker
//! processes ([`Cluster`]); both report the same events, so everything from admission to the
//! stream the caller reads is shared.

use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tome_model::{Bounded, ModelDir, Prepared};
use tome_net::{tensor_to_wire, TraceParent};
use tome_proto::v1 as pb;
use tome_server::auth::Caller;
use tome_worker::transport::{self, Hosts, Transport};
use tome_worker::{spawn_job, JobEvent, JobOutput, JobSpec};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, info_span, Instrument};

use crate::cluster::Cluster;
use crate::config::CoordinatorConfig;
use crate::error::CoordError;
use crate::metrics::{self, JobOutcome};
use crate::queue::{until, JobQueue, Running, Ticket};
use crate::request::{chunk_spans, document_text, parse_options, JobOptions};

/// Events waiting for a slow caller before the job waits too.
const EVENT_BUFFER: usize = 32;

pub struct Coordinator {
    models: Vec<Arc<ModelDir>>,
    config: CoordinatorConfig,
    backend: Backend,
    /// The running jobs and the requests waiting to run.
    queue: JobQueue,
    /// Places for documents being tokenized, apart from the jobs' places: a caller's long text
    /// never holds a place a running job could use.
    tokenizing: Arc<Semaphore>,
    next_job: AtomicU64,
    /// False once shutdown has begun: new jobs are refused.
    admitting: AtomicBool,
    /// Set to true to cancel every job in flight (end of the shutdown grace period).
    abort: tokio::sync::watch::Sender<bool>,
}

/// Where a job's ranks run.
enum Backend {
    /// Threads of this process.
    Embedded,
    /// Worker processes.
    Cluster(Arc<Cluster>),
}

/// Holds a job's running place until it ends.
struct Admission {
    place: Running,
    queue: JobQueue,
}

impl Admission {
    /// Gives the job's place back. The last job out hands the heap's freed pages back to the
    /// kernel (`tome_server::heap`), so that an idle coordinator holds only what it uses.
    fn end(self) {
        let Admission { place, queue } = self;
        drop(place);
        if queue.running() == 0 {
            tokio::task::spawn_blocking(metrics::release_heap);
        }
    }
}

/// A document tokenized and checked, ready to run.
struct Admitted {
    model: Arc<ModelDir>,
    doc: Prepared,
    offsets: Option<Vec<(usize, usize)>>,
    tokenize_seconds: f64,
}

impl Coordinator {
    /// A coordinator serving `models` (the first is the default) whose ranks are threads of
    /// this process.
    pub fn new(models: Vec<ModelDir>, config: CoordinatorConfig) -> Result<Self, CoordError> {
        Self::build(models, config, Backend::Embedded)
    }

    /// A coordinator serving `models` on the workers of `cluster`.
    pub fn with_cluster(models: Vec<ModelDir>, config: CoordinatorConfig, cluster: Arc<Cluster>) -> Result<Self, CoordError> {
        Self::build(models, config, Backend::Cluster(cluster))
    }

    fn build(models: Vec<ModelDir>, config: CoordinatorConfig, backend: Backend) -> Result<Self, CoordError> {
        if models.is_empty() {
            return Err(CoordError::Invalid("a coordinator needs at least one model".into()));
        }
        if config.default_ranks == 0 || config.default_ranks > config.limits.max_ranks {
            return Err(CoordError::Invalid(format!("default ranks {} must be within 1..={}", config.default_ranks, config.limits.max_ranks)));
        }
        metrics::describe();
        let queue = JobQueue::new(config.limits.queue());
        let tokenizing = Arc::new(Semaphore::new(config.limits.max_concurrent_jobs));
        Ok(Coordinator {
            models: models.into_iter().map(Arc::new).collect(),
            config,
            backend,
            queue,
            tokenizing,
            next_job: AtomicU64::new(1),
            admitting: AtomicBool::new(true),
            abort: tokio::sync::watch::channel(false).0,
        })
    }

    /// Refuses new jobs from now on (shutdown has begun), and the requests waiting in the queue
    /// or for a tokenizer too (UNAVAILABLE: their callers retry elsewhere); jobs running go on.
    pub fn stop_admitting(&self) {
        self.admitting.store(false, Ordering::Relaxed);
        self.queue.close();
        self.tokenizing.close();
    }

    /// Whether jobs can run here now: admitting, and (a cluster) with a live worker.
    pub fn is_ready(&self) -> bool {
        self.admitting.load(Ordering::Relaxed)
            && match &self.backend {
                Backend::Embedded => true,
                Backend::Cluster(c) => !c.live().is_empty(),
            }
    }

    /// Jobs in flight now.
    pub fn jobs_in_flight(&self) -> usize {
        self.queue.running()
    }

    /// Waits up to `limit` for every job in flight to end; true if they did.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.jobs_in_flight() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Cancels every job in flight (their callers get UNAVAILABLE).
    pub fn cancel_all(&self) {
        self.abort.send_replace(true);
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    fn model(&self, name: &str) -> Result<Arc<ModelDir>, CoordError> {
        if name.is_empty() {
            return self.models.first().cloned().ok_or_else(|| CoordError::UnknownModel(String::new()));
        }
        self.models.iter().find(|m| m.name() == name).cloned().ok_or_else(|| CoordError::UnknownModel(name.into()))
    }

    /// Waits for a tokenizer (until `deadline`), then tokenizes, while `_ticket` holds the
    /// request's place in the queue.
    async fn tokenize_waiting(
        &self,
        _ticket: &Ticket,
        model: Arc<ModelDir>,
        input: Option<pb::process_request::Input>,
        opts: &JobOptions,
        deadline: Option<Instant>,
    ) -> Result<Admitted, CoordError> {
        let _tokenizer = until(deadline, self.tokenizing.clone().acquire_owned()).await?.map_err(|_| CoordError::Unavailable("the server is shutting down".into()))?;
        self.admit(model, input, opts).await
    }

    /// Tokenizes and checks the input on a blocking thread (a book takes a while to tokenize).
    async fn admit(&self, model: Arc<ModelDir>, input: Option<pb::process_request::Input>, opts: &JobOptions) -> Result<Admitted, CoordError> {
        let limits = self.config.limits.clone();
        let encode = opts.encode.clone();
        let task = tokio::task::spawn_blocking(move || -> Result<Admitted, CoordError> {
            let started = Instant::now();
            let (ids, offsets) = match input {
                None => return Err(CoordError::Invalid("the request has no input (text or token_ids)".into())),
                Some(pb::process_request::Input::Text(bytes)) => {
                    let text = document_text(&bytes, limits.max_document_bytes)?;
                    let tokenizer = model.tokenizer.as_ref().ok_or_else(|| CoordError::Invalid(format!("model `{}` has no tokenizer.json: send token_ids", model.name())))?;
                    match tokenizer.encode_at_most(text, limits.max_document_tokens)? {
                        Bounded::Encoded(enc) => (enc.ids, Some(enc.offsets)),
                        Bounded::TooLong { tokens } => return Err(too_long(tokens, limits.max_document_tokens)),
                    }
                }
                Some(pb::process_request::Input::TokenIds(t)) => {
                    if t.ids.len() > limits.max_document_tokens {
                        return Err(too_long(t.ids.len(), limits.max_document_tokens));
                    }
                    let ids = t
                        .ids
                        .iter()
                        .enumerate()
                        .map(|(i, &id)| u32::try_from(id).map_err(|_| CoordError::Invalid(format!("token {i} has id {id}, not a vocabulary index"))))
                        .collect::<Result<Vec<u32>, _>>()?;
                    (ids, None)
                }
            };
            if ids.len() > limits.max_document_tokens {
                return Err(too_long(ids.len(), limits.max_document_tokens));
            }
            let tokenize_seconds = started.elapsed().as_secs_f64();
            let doc = model.model.prepare(ids, &encode)?;
            Ok(Admitted { model, doc, offsets, tokenize_seconds })
        });
        task.await.map_err(|e| CoordError::Internal(format!("tokenizer task failed: {e}")))?
    }
}

/// What a call's metadata says about the job: its deadline and trace context.
struct CallContext {
    deadline: Option<Instant>,
    /// The caller's trace context (`traceparent`), when it sent one.
    trace: Option<TraceParent>,
    /// Who called (the API key's caller), for metrics and logs.
    caller: Caller,
}

impl CallContext {
    fn of<T>(req: &Request<T>) -> Self {
        let metadata = req.metadata();
        let caller = req.extensions().get::<Caller>().cloned().unwrap_or_else(Caller::anonymous);
        let deadline = tome_server::grpc_timeout(metadata).map(|t| Instant::now() + t);
        let trace = metadata.get(tome_net::traceparent::TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
        CallContext { deadline, trace, caller }
    }
}

/// An upload stream's failure: a message over --max-message-bytes is RESOURCE_EXHAUSTED, as for
/// any other limit (tonic reports it as OUT_OF_RANGE), a caller that went away CANCELLED, and
/// anything else the request's fault.
fn upload_broke(s: Status) -> CoordError {
    match s.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => CoordError::Exhausted(format!("upload: {}", s.message())),
        tonic::Code::Cancelled => CoordError::Cancelled,
        _ => CoordError::Invalid(format!("upload: {}", s.message())),
    }
}

/// Reads an upload: the request first, then the text in order, within the byte limit.
async fn receive_upload(mut stream: Streaming<pb::UploadChunk>, max_bytes: usize) -> Result<pb::ProcessRequest, CoordError> {
    let first = stream.message().await.map_err(upload_broke)?;
    let mut request = match first.and_then(|c| c.part) {
        Some(pb::upload_chunk::Part::Request(r)) => r,
        _ => return Err(CoordError::Invalid("an upload must start with its request".into())),
    };
    let mut text = match request.input.take() {
        None => Vec::new(),
        Some(pb::process_request::Input::Text(t)) => t,
        Some(pb::process_request::Input::TokenIds(_)) => return Err(CoordError::Invalid("an upload carries text, not token ids".into())),
    };
    while let Some(chunk) = stream.message().await.map_err(upload_broke)? {
        match chunk.part {
            Some(pb::upload_chunk::Part::Text(t)) => {
                if text.len() + t.len() > max_bytes {
                    return Err(CoordError::Exhausted(format!("the upload exceeds {max_bytes} bytes, the most this server accepts")));
                }
                text.extend_from_slice(&t);
            }
            Some(pb::upload_chunk::Part::Request(_)) => return Err(CoordError::Invalid("an upload carries one request, first".into())),
            None => return Err(CoordError::Invalid("an upload message carries nothing".into())),
        }
    }
    request.input = Some(pb::process_request::Input::Text(text));
    Ok(request)
}

impl Coordinator {
    /// Admits, tokenizes and plans a request, then starts its job; returns the event stream. A
    /// refusal is counted by its reason.
    async fn start(&self, req: pb::ProcessRequest, context: CallContext) -> Result<<Self as pb::tome_server::Tome>::ProcessStream, CoordError> {
        self.start_job(req, context).await.inspect_err(metrics::refused)
    }

    async fn start_job(&self, req: pb::ProcessRequest, context: CallContext) -> Result<<Self as pb::tome_server::Tome>::ProcessStream, CoordError> {
        let started = Instant::now();
        if !self.admitting.load(Ordering::Relaxed) {
            return Err(CoordError::Unavailable("the server is shutting down".into()));
        }
        let model = self.model(&req.model)?;
        let opts = parse_options(req.options.as_ref())?;
        // Before the queue and the tokenizer: a precision the model lacks on the ranks that
        // would run it costs nothing (a cluster's workers say where they compute, and refuse
        // what their device lacks).
        match (&self.backend, self.config.device) {
            (Backend::Embedded, device) => model.model.check_precision_on(opts.encode.precision, device != tome_model::gpu::DeviceSpec::Cpu)?,
            (Backend::Cluster(_), _) => model.model.check_precision(opts.encode.precision)?,
        }
        let ranks = opts.ranks.unwrap_or(self.config.default_ranks);
        if ranks > self.config.limits.max_ranks {
            return Err(CoordError::Exhausted(format!("{ranks} ranks asked; this server allows at most {}", self.config.limits.max_ranks)));
        }
        if opts.log_probs && !model.model.is_causal() {
            return Err(CoordError::Invalid(format!("model `{}` is an encoder; log-probs need a causal language model", model.name())));
        }
        if opts.log_probs && opts.encode.output_layer.is_some_and(|k| k != model.model.shape().num_layers) {
            return Err(CoordError::Invalid("log-probs score the last layer's hidden states: leave options.hidden_layer unset".into()));
        }
        let ticket = self.queue.arrive(&context.caller)?;
        let admitted = self.tokenize_waiting(&ticket, model, req.input, &opts, context.deadline).await?;
        metrics::stage_seconds("tokenize", Duration::from_secs_f64(admitted.tokenize_seconds));
        let tokens = admitted.doc.len();
        let place = ticket.wait_to_run(tokens, context.deadline).await?;
        let chunks = if opts.chunks { chunk_spans(&opts.chunking, tokens, self.config.default_chunk_tokens)? } else { Vec::new() };
        let pooling = opts.pooling.unwrap_or(admitted.model.pooling);
        let model_name = admitted.model.name();
        let layer_attention: Vec<String> = admitted.doc.layers.iter().map(|l| l.to_string()).collect();
        let mut spec = JobSpec::new(admitted.model, Arc::new(admitted.doc), ranks, opts.layout).map_err(CoordError::from)?;
        spec.chunks = chunks;
        spec.document = opts.document;
        spec.hidden = opts.hidden;
        spec.log_probs = opts.log_probs;
        spec.pooling = pooling;
        spec.normalize = opts.normalize.unwrap_or(spec.model.normalize);
        let (cluster, placement) = match &self.backend {
            Backend::Embedded => {
                spec.device = self.config.device;
                (None, None)
            }
            Backend::Cluster(c) => (Some(c.clone()), Some(c.place(&spec)?)),
        };

        // Unique across coordinators: workers key ranks, peers and cancellation by job id.
        let id = format!("job-{:016x}{:08x}", rand::random::<u64>(), self.next_job.fetch_add(1, Ordering::Relaxed) as u32);
        let accepted = pb::Accepted {
            job_id: id.clone(),
            model: model_name,
            tokens: tokens as u64,
            ranks: ranks as u32,
            layout: match opts.layout {
                tome_dist::Layout::Contiguous => pb::Layout::Contiguous,
                tome_dist::Layout::Zigzag => pb::Layout::Zigzag,
            } as i32,
            shard_tokens: (0..ranks).map(|r| spec.plan.shard_len(r) as u64).collect(),
            layer_attention,
        };
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        // Buffered, so this cannot block: the receiver is still here and the buffer is empty.
        let _ = tx.try_send(event(pb::process_event::Event::Accepted(accepted)));
        let span = info_span!("process", job = %id, caller = context.caller.name(), tokens, ranks, trace_id = tracing::field::Empty);
        // The job's ranks are children of this span in exported traces.
        let trace = tome_net::traceparent::continue_trace(&span, context.trace);
        span.record("trace_id", trace.trace_id_hex());
        let job = Job {
            id,
            spec,
            placement,
            deadline: context.deadline,
            trace,
            caller: context.caller,
            offsets: admitted.offsets,
            hidden_dtype: opts.hidden_dtype,
            rows_per_message: self.config.hidden_rows_per_message,
            tokenize_seconds: admitted.tokenize_seconds,
            started,
        };
        let admission = Admission { place, queue: self.queue.clone() };
        let abort = self.abort.subscribe();
        tokio::spawn(async move {
            drive(job, cluster, tx, abort).instrument(span).await;
            // The job's span has closed before its place is given back, so a shutdown that
            // waits for the jobs in flight exports it.
            admission.end();
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

fn too_long(tokens: usize, max: usize) -> CoordError {
    CoordError::Exhausted(format!("the document has at least {tokens} tokens; this server accepts at most {max}"))
}

type EventSender = mpsc::Sender<Result<pb::ProcessEvent, Status>>;

fn event(e: pb::process_event::Event) -> Result<pb::ProcessEvent, Status> {
    Ok(pb::ProcessEvent { event: Some(e) })
}

/// Character span covered by tokens `span` (special tokens have empty offsets and are skipped).
fn char_span(offsets: &[(usize, usize)], span: &Range<usize>) -> Option<pb::Span> {
    let covered = offsets[span.clone()].iter().filter(|(a, b)| b > a);
    let start = covered.clone().map(|o| o.0).min()?;
    let end = covered.map(|o| o.1).max()?;
    Some(pb::Span { start: start as u64, end: end as u64 })
}

struct Job {
    id: String,
    spec: JobSpec,
    placement: Option<crate::cluster::Placement>,
    deadline: Option<Instant>,
    trace: TraceParent,
    caller: Caller,
    offsets: Option<Vec<(usize, usize)>>,
    hidden_dtype: pb::ElementType,
    rows_per_message: usize,
    tokenize_seconds: f64,
    started: Instant,
}

/// Runs an admitted job and streams its events (its caller holds the admission until it ends).
async fn drive(job: Job, backend: Option<Arc<Cluster>>, tx: EventSender, abort: tokio::sync::watch::Receiver<bool>) {
    let in_flight = metrics::JobInFlight::start();
    let caller = job.caller.clone();
    let outcome = drive_events(job, backend, &tx, abort).await;
    metrics::job_ended(outcome, &caller);
    drop(in_flight);
}

async fn drive_events(job: Job, backend: Option<Arc<Cluster>>, tx: &EventSender, mut abort: tokio::sync::watch::Receiver<bool>) -> JobOutcome {
    let cancel = Arc::new(AtomicBool::new(false));
    let (jtx, mut jrx) = mpsc::channel(8);
    let chunks = job.spec.chunks.clone();
    let tokens = job.spec.doc.len();
    let transport = job.placement.as_ref().map_or(transport::choose(Hosts::ThisProcess), |p| p.transport);
    match (transport, backend, job.placement) {
        (Transport::PeerStreams | Transport::Nccl, Some(cluster), Some(placement)) => cluster.spawn(job.id.clone(), job.spec, placement, jtx, job.deadline, job.trace),
        (Transport::InProcess, _, _) => {
            if let Err(e) = spawn_job(job.spec, jtx, cancel.clone()) {
                return fail(tx, e.into()).await;
            }
        }
        (transport, ..) => {
            return fail(tx, CoordError::Internal(format!("a job placed for transport {} has no cluster to run on", transport.name()))).await;
        }
    }
    let expired = async {
        match job.deadline {
            Some(d) => tokio::time::sleep_until(d.into()).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(expired);
    loop {
        let ev = tokio::select! {
            ev = jrx.recv() => match ev {
                Some(ev) => ev,
                None => return JobOutcome::Failed,
            },
            _ = &mut expired => {
                cancel.store(true, Ordering::Relaxed);
                return fail(tx, CoordError::DeadlineExceeded).await;
            }
            _ = async {
                // A coordinator dropped without aborting (its last handle went) lets jobs finish.
                if abort.wait_for(|&a| a).await.is_err() {
                    std::future::pending::<()>().await;
                }
            } => {
                cancel.store(true, Ordering::Relaxed);
                let _ = tx.send(Err(CoordError::Unavailable("the server shut down before the job finished; retry elsewhere".into()).into())).await;
                return JobOutcome::Cancelled;
            }
        };
        let sent = match ev {
            Ok(JobEvent::Progress { done, total }) => {
                tx.send(event(pb::process_event::Event::Progress(pb::Progress { layers_done: done as u32, layers_total: total as u32 }))).await
            }
            Ok(JobEvent::Finished(out)) => {
                metrics::stage_seconds("compute", out.compute);
                if let Err(e) = emit(&job.id, &out, &chunks, job.offsets.as_deref(), job.hidden_dtype, job.rows_per_message, tx).await {
                    return fail(tx, e).await;
                }
                let done = pb::Done {
                    tokens: tokens as u64,
                    tokenize_seconds: job.tokenize_seconds,
                    compute_seconds: out.compute.as_secs_f64(),
                    total_seconds: job.started.elapsed().as_secs_f64(),
                    bytes_exchanged: out.bytes_exchanged,
                    wire_bytes_exchanged: out.wire_bytes_exchanged,
                    perplexity: out.perplexity,
                };
                metrics::stage_seconds("total", job.started.elapsed());
                metrics::tokens_processed(tokens, &job.caller);
                info!(job = %job.id, tokens, compute_s = done.compute_seconds, "job done");
                let _ = tx.send(event(pb::process_event::Event::Done(done))).await;
                return JobOutcome::Ok;
            }
            Err(e) => return fail(tx, e.into()).await,
        };
        if sent.is_err() {
            // The caller went away: stop every rank (dropping the receiver stops a cluster job).
            info!(job = %job.id, "caller left; cancelling");
            cancel.store(true, Ordering::Relaxed);
            return JobOutcome::Cancelled;
        }
    }
}

/// Ends a job with `e`: the caller gets its status, the metrics its outcome.
async fn fail(tx: &EventSender, e: CoordError) -> JobOutcome {
    let outcome = JobOutcome::of(&e);
    let _ = tx.send(Err(e.into())).await;
    outcome
}

async fn emit(
    job: &str,
    out: &JobOutput,
    chunks: &[Range<usize>],
    offsets: Option<&[(usize, usize)]>,
    hidden_dtype: pb::ElementType,
    rows_per_message: usize,
    tx: &EventSender,
) -> Result<(), CoordError> {
    let wire = |t: &candle_core::Tensor, dt| tensor_to_wire(t, dt).map_err(|e| CoordError::Internal(format!("job {job}: {e}")));
    let closed = |_| CoordError::Cancelled;
    if let Some(c) = &out.chunks {
        for (i, span) in chunks.iter().enumerate() {
            let emb = c.get(i).map_err(|e| CoordError::Internal(e.to_string()))?;
            let chunk = pb::ChunkEmbedding {
                index: i as u32,
                tokens: Some(pb::Span { start: span.start as u64, end: span.end as u64 }),
                chars: offsets.and_then(|o| char_span(o, span)),
                embedding: Some(wire(&emb, pb::ElementType::F32)?),
            };
            tx.send(event(pb::process_event::Event::Chunk(chunk))).await.map_err(closed)?;
        }
    }
    if let Some(d) = &out.document {
        let doc = pb::DocumentEmbedding { embedding: Some(wire(d, pb::ElementType::F32)?) };
        tx.send(event(pb::process_event::Event::Document(doc))).await.map_err(closed)?;
    }
    if let Some(lp) = &out.log_probs {
        let n = lp.dim(0).map_err(|e| CoordError::Internal(e.to_string()))?;
        for start in (0..n).step_by(rows_per_message.max(1)) {
            let len = rows_per_message.min(n - start);
            let part = lp.narrow(0, start, len).map_err(|e| CoordError::Internal(e.to_string()))?;
            let values = pb::LogProbs { token_start: start as u64, values: Some(wire(&part, pb::ElementType::F32)?) };
            tx.send(event(pb::process_event::Event::LogProbs(values))).await.map_err(closed)?;
        }
    }
    if let Some(h) = &out.hidden {
        let rows = h.dim(0).map_err(|e| CoordError::Internal(e.to_string()))?;
        for start in (0..rows).step_by(rows_per_message.max(1)) {
            let len = rows_per_message.min(rows - start);
            let part = h.narrow(0, start, len).map_err(|e| CoordError::Internal(e.to_string()))?;
            let states = pb::HiddenStates { token_start: start as u64, states: Some(wire(&part, hidden_dtype)?) };
            tx.send(event(pb::process_event::Event::HiddenStates(states))).await.map_err(closed)?;
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::tome_server::Tome for Coordinator {
    async fn info(&self, _req: Request<pb::InfoRequest>) -> Result<Response<pb::InfoResponse>, Status> {
        let l = &self.config.limits;
        let (backend, workers) = match &self.backend {
            Backend::Embedded => ("embedded", Vec::new()),
            Backend::Cluster(c) => ("cluster", c.live().iter().map(|w| format!("{}@{}", w.name, w.address)).collect()),
        };
        let (gpus, gpus_missing) = tome_worker::gpu_devices();
        Ok(Response::new(pb::InfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            models: self.models.iter().map(|m| tome_worker::model_info(m, &[])).collect(),
            default_ranks: self.config.default_ranks as u32,
            limits: Some(pb::Limits {
                max_document_tokens: l.max_document_tokens as u64,
                max_document_bytes: l.max_document_bytes as u64,
                max_ranks: l.max_ranks as u32,
                max_concurrent_jobs: l.max_concurrent_jobs as u32,
                max_tokens_in_flight: l.max_tokens_in_flight as u64,
                max_queued_requests: l.max_queued_requests as u32,
                max_queued_tokens: l.max_queued_tokens as u64,
                max_jobs_per_caller: l.max_jobs_per_caller as u32,
            }),
            backend: backend.into(),
            workers,
            bf16_kernel: tome_attn::bf16::Bf16Kernel::detect().name().into(),
            gpus,
            gpus_missing,
        }))
    }

    type ProcessStream = Pin<Box<dyn Stream<Item = Result<pb::ProcessEvent, Status>> + Send + 'static>>;

    async fn process(&self, req: Request<pb::ProcessRequest>) -> Result<Response<Self::ProcessStream>, Status> {
        let context = CallContext::of(&req);
        let stream = self.start(req.into_inner(), context).await?;
        Ok(Response::new(stream))
    }

    type ProcessUploadStream = Self::ProcessStream;

    async fn process_upload(&self, req: Request<Streaming<pb::UploadChunk>>) -> Result<Response<Self::ProcessUploadStream>, Status> {
        let context = CallContext::of(&req);
        let request = receive_upload(req.into_inner(), self.config.limits.max_document_bytes).await.inspect_err(metrics::refused)?;
        let stream = self.start(request, context).await?;
        Ok(Response::new(stream))
    }

    async fn tokenize(&self, req: Request<pb::TokenizeRequest>) -> Result<Response<pb::TokenizeResponse>, Status> {
        let context = CallContext::of(&req);
        Ok(Response::new(self.tokenize_text(req.into_inner(), context).await.inspect_err(metrics::refused)?))
    }
}

impl Coordinator {
    /// `Tome::tokenize`: in the queue like a job's request (it waits for a tokenizer, not for a
    /// running place).
    async fn tokenize_text(&self, req: pb::TokenizeRequest, context: CallContext) -> Result<pb::TokenizeResponse, CoordError> {
        let model = self.model(&req.model)?;
        let limits = self.config.limits.clone();
        let _ticket = self.queue.arrive(&context.caller)?;
        let _tokenizer = until(context.deadline, self.tokenizing.clone().acquire_owned()).await?.map_err(|_| CoordError::Unavailable("the server is shutting down".into()))?;
        let enc = tokio::task::spawn_blocking(move || -> Result<_, CoordError> {
            let text = document_text(&req.text, limits.max_document_bytes)?;
            let tokenizer = model.tokenizer.as_ref().ok_or_else(|| CoordError::Invalid(format!("model `{}` has no tokenizer.json", model.name())))?;
            match tokenizer.encode_at_most(text, limits.max_document_tokens)? {
                Bounded::Encoded(enc) => Ok(enc),
                Bounded::TooLong { tokens } => Err(too_long(tokens, limits.max_document_tokens)),
            }
        })
        .await
        .map_err(|e| CoordError::Internal(e.to_string()))??;
        Ok(pb::TokenizeResponse {
            ids: enc.ids.iter().map(|&i| i as i64).collect(),
            offsets: enc.offsets.iter().map(|&(a, b)| pb::Span { start: a as u64, end: b as u64 }).collect(),
        })
    }
}
