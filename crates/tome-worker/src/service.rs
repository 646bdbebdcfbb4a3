//! `tome.v1.Worker`: runs one rank of a job per `RunShard` call, on a dedicated compute thread.
//!
//! The thread joins the job's peer group (the hub routes the other ranks' frames to it), runs
//! the rank (`run_rank`, the same code as the in-process backend) and reports over a bounded
//! channel: progress, hidden-state row blocks, then the shard's result. The async side only
//! forwards. A job stops at the next layer boundary — and any wait on a peer ends at once — when
//! the coordinator calls `Cancel`, drops the call, or the job's deadline passes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tome_model::gpu::{DeviceSpec, GpuFootprint};
use tome_model::{ModelDir, RunOptions, ShardInput};
use tome_net::{tensor_to_wire, JobSecret, PeerHub, TraceParent};
use tome_proto::v1 as pb;
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn};

use crate::error::WorkerError;
use crate::gpu_footprint::GpuBudget;
use crate::job::{run_rank, RankWork};
use crate::memory::{activation_bytes, RankLoad};
use crate::metrics;
use crate::transport::{self, GpuLease, NcclGpus, Rendezvous, Transport};
use crate::wire;

/// The worker's settings; every one is a flag of `tome serve worker`.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Unique among a deployment's workers.
    pub name: String,
    /// Where coordinators and other workers reach this one (host:port).
    pub advertise: String,
    /// Shards run at once; more are refused.
    pub max_shards: usize,
    /// Activation memory offered to the shards running at once.
    pub memory_budget_bytes: u64,
    /// Where this worker's ranks compute.
    pub device: DeviceSpec,
}

/// A running shard's job secret and cancel flag, by job id.
type RunningShards = HashMap<String, Vec<(JobSecret, Arc<AtomicBool>)>>;

/// Events waiting for a slow coordinator before the shard waits too.
const EVENT_BUFFER: usize = 16;

pub struct WorkerService {
    models: Vec<Arc<ModelDir>>,
    hub: PeerHub,
    /// The GPUs ranks talking over NCCL take, one each.
    gpus: NcclGpus,
    config: WorkerConfig,
    shards: Arc<Semaphore>,
    /// The memory budget in KiB, reserved by each running shard for its activations.
    memory_kib: Arc<Semaphore>,
    /// The shards running here, by job.
    running: Arc<Mutex<RunningShards>>,
    /// False once shutdown has begun: new shards are refused.
    admitting: AtomicBool,
    /// Each model's GPU footprints, measured at start (GPU ranks only), by model name.
    footprints: HashMap<String, Vec<GpuFootprint>>,
    /// What the running shards hold of each GPU (GPU ranks with footprints only).
    gpu_budget: GpuBudget,
}

impl WorkerService {
    pub fn new(models: Vec<Arc<ModelDir>>, hub: PeerHub, config: WorkerConfig, gpus: NcclGpus) -> Self {
        let shards = Arc::new(Semaphore::new(config.max_shards));
        let memory_kib = Arc::new(Semaphore::new(((config.memory_budget_bytes / 1024) as usize).min(Semaphore::MAX_PERMITS)));
        WorkerService {
            models,
            hub,
            gpus,
            config,
            shards,
            memory_kib,
            running: Arc::default(),
            admitting: AtomicBool::new(true),
            footprints: HashMap::new(),
            gpu_budget: GpuBudget::new([]),
        }
    }

    /// The models' GPU footprints this worker measured ([`crate::measure_footprints`]), which
    /// its Info reports.
    pub fn with_footprints(mut self, footprints: HashMap<String, Vec<GpuFootprint>>) -> Self {
        if !footprints.is_empty() {
            self.gpu_budget = GpuBudget::of_this_machine();
        }
        self.footprints = footprints;
        self
    }

    /// Room for `shard`'s activations on its GPU, from its model's footprint in its precision;
    /// `None` for CPU ranks and where no footprint was measured.
    fn admit_on_gpu(&self, shard: &Shard) -> Result<Option<OwnedSemaphorePermit>, WorkerError> {
        let precision = shard.input.run.precision;
        let Some(f) = self.footprints.get(&shard.model.name()).and_then(|fs| fs.iter().find(|f| f.precision == precision)) else {
            return Ok(None);
        };
        let Some(gpu) = self.config.device.gpu_for(shard.gpu_slot()).map_err(tome_model::ModelError::from)? else {
            return Ok(None);
        };
        self.gpu_budget.admit(&self.config.name, gpu, &shard.model.name(), f, shard.plan.shard_len(shard.rank))
    }

    /// Refuses new shards from now on (shutdown has begun).
    pub fn stop_admitting(&self) {
        self.admitting.store(false, Ordering::Relaxed);
    }

    /// Shards running now.
    pub fn shards_running(&self) -> usize {
        self.config.max_shards - self.shards.available_permits()
    }

    /// Waits up to `limit` for every running shard to end; true if they did.
    pub async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.shards_running() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }

    /// Cancels every running shard.
    pub fn cancel_all(&self) {
        let shards: Vec<(String, JobSecret)> = self.lock_running().iter().flat_map(|(job, shards)| shards.iter().map(|(s, _)| (job.clone(), s.clone()))).collect();
        for (job, secret) in shards {
            self.cancel_job(&job, &secret);
        }
    }

    /// Cancels the shards of `job` run here under `secret`; returns how many there were.
    fn cancel_job(&self, job: &str, secret: &JobSecret) -> usize {
        let flags: Vec<Arc<AtomicBool>> =
            self.lock_running().get(job).map(|shards| shards.iter().filter(|(s, _)| s.same(secret)).map(|(_, f)| f.clone()).collect()).unwrap_or_default();
        for f in &flags {
            f.store(true, Ordering::Relaxed);
        }
        self.hub.cancel(job, secret);
        flags.len()
    }

    /// Whether shards of `job` run here under a secret other than `secret`.
    fn runs_under_another_secret(&self, job: &str, secret: &JobSecret) -> bool {
        self.lock_running().get(job).is_some_and(|shards| shards.iter().any(|(s, _)| !s.same(secret)))
    }

    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// What this worker is, as its `Info` says (also what it registers in etcd).
    pub fn info(&self) -> pb::WorkerInfo {
        let (gpus, gpus_missing) = crate::gpu_devices();
        pb::WorkerInfo {
            name: self.config.name.clone(),
            address: self.config.advertise.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            device: match self.config.device {
                DeviceSpec::Cpu => format!("cpu, {} threads", candle_core::utils::get_num_threads()),
                gpu => format!("{gpu}, with {} CPU threads", candle_core::utils::get_num_threads()),
            },
            models: self.models.iter().map(|m| crate::model_info(m, self.footprints.get(&m.name()).map_or(&[], Vec::as_slice))).collect(),
            memory_budget_bytes: self.config.memory_budget_bytes,
            max_shards: self.config.max_shards as u32,
            shards_running: self.shards_running() as u32,
            nccl_gpus: u32::try_from(self.gpus.count()).unwrap_or(u32::MAX),
            bf16_kernel: tome_attn::bf16::Bf16Kernel::detect().name().into(),
            gpus,
            gpus_missing,
            gpu_ranks: self.config.device != DeviceSpec::Cpu,
            rank_gpus: crate::rank_gpus(self.config.device).into_iter().map(|g| u32::try_from(g).unwrap_or(u32::MAX)).collect(),
        }
    }

    fn model(&self, name: &str) -> Result<Arc<ModelDir>, WorkerError> {
        let found = if name.is_empty() { self.models.first() } else { self.models.iter().find(|m| m.name() == name) };
        found.cloned().ok_or_else(|| WorkerError::UnknownModel(name.into()))
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, RunningShards> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A `RunShard` request, checked.
struct Shard {
    job: String,
    secret: JobSecret,
    rank: usize,
    addresses: Vec<String>,
    transport: Transport,
    plan: tome_dist::ShardPlan,
    model: Arc<ModelDir>,
    input: ShardInput,
    spans: Vec<std::ops::Range<usize>>,
    pooling: tome_model::Pooling,
    hidden: bool,
    /// The id after each of the rank's rows, when it scores its tokens.
    next_ids: Option<Vec<u32>>,
    rows_per_message: usize,
    trace: Option<TraceParent>,
}

impl Shard {
    /// The rank's place among the job's ranks on this worker (those at its address before it):
    /// which of the worker's GPUs it takes.
    fn gpu_slot(&self) -> usize {
        self.addresses.iter().take(self.rank).filter(|&a| Some(a) == self.addresses.get(self.rank)).count()
    }

    /// What the rank runs, for its memory estimate (the coordinator derives the same from the
    /// job).
    fn load(&self) -> RankLoad<'_> {
        RankLoad {
            tokens: self.plan.shard_len(self.rank),
            document: self.plan.len(),
            ranks: self.plan.ranks(),
            layers: &self.input.layers[..self.input.layers_run()],
            global_tokens: self.input.global_tokens.len(),
            segment_len: self.input.run.segment_len,
            spans: self.spans.len(),
            log_probs: self.next_ids.is_some(),
        }
    }
}

fn parse(service: &WorkerService, req: pb::ShardRequest, trace: Option<TraceParent>) -> Result<Shard, WorkerError> {
    let plan_msg = req.plan.ok_or_else(|| WorkerError::Invalid("the shard request has no plan".into()))?;
    tome_net::check_job_id(&plan_msg.job_id).map_err(|e| WorkerError::Invalid(format!("plan.job_id: {e}")))?;
    let secret = JobSecret::from_wire(&plan_msg.secret, "plan.secret").map_err(WorkerError::Invalid)?;
    let plan = wire::plan_from_wire(plan_msg.tokens, &plan_msg.shards)?;
    let rank = req.rank as usize;
    if rank >= plan.ranks() || plan_msg.rank_addresses.len() != plan.ranks() {
        return Err(WorkerError::Invalid(format!("rank {rank} of a plan with {} ranks and {} rank addresses", plan.ranks(), plan_msg.rank_addresses.len())));
    }
    let model = service.model(&req.model)?;
    let input = ShardInput {
        ids: wire::u32s_from_wire(req.token_ids.as_ref(), "token_ids")?,
        position_ids: wire::u32s_from_wire(req.position_ids.as_ref(), "position_ids")?,
        layers: wire::layers_from_wire(&req.layers, &model.model.shape(), plan.len())?,
        global_tokens: req.global_tokens.iter().map(|&g| g as usize).collect(),
        run: RunOptions {
            output_layer: req.output_layer.map(|k| k as usize),
            segment_len: (req.segment_len > 0).then_some(req.segment_len as usize),
            precision: wire::precision_from_wire(req.precision, "precision")?,
        },
    };
    model.model.check_precision_on(input.run.precision, service.config.device != DeviceSpec::Cpu)?;
    let rows = plan.shard_len(rank);
    if input.ids.len() != rows || input.position_ids.len() != rows {
        return Err(WorkerError::Invalid(format!("{} token ids and {} position ids for rank {rank} of {rows} tokens", input.ids.len(), input.position_ids.len())));
    }
    if let Some(g) = input.global_tokens.iter().find(|&&g| g >= plan.len()) {
        return Err(WorkerError::Invalid(format!("global token {g} is outside the plan's {} tokens", plan.len())));
    }
    let layers = model.model.shape().num_layers;
    if let Some(k) = input.run.output_layer.filter(|&k| k > layers) {
        return Err(WorkerError::Invalid(format!("output layer {k} of a model with {layers} layers")));
    }
    let trace = trace.or_else(|| TraceParent::parse(&plan_msg.traceparent));
    let next_ids = if req.log_probs {
        let next = wire::u32s_from_wire(req.next_ids.as_ref(), "next_ids")?;
        let rows = plan.shard_len(rank);
        if next.len() > rows || next.len() + 1 < rows {
            return Err(WorkerError::Invalid(format!("{} next ids for a rank of {rows} tokens", next.len())));
        }
        if !model.model.is_causal() {
            return Err(WorkerError::Invalid(format!("model `{}` is an encoder: it does not score tokens", model.name())));
        }
        if input.run.output_layer.is_some_and(|k| k != model.model.shape().num_layers) {
            return Err(WorkerError::Invalid("log-probs score the last layer's hidden states; an earlier output layer was asked for".into()));
        }
        Some(next)
    } else {
        None
    };
    Ok(Shard {
        next_ids,
        transport: wire::transport_from_wire(plan_msg.transport)?,
        job: plan_msg.job_id,
        secret,
        rank,
        addresses: plan_msg.rank_addresses,
        spans: wire::spans_from_wire(&req.pool_spans, plan.len())?,
        plan,
        model,
        input,
        pooling: wire::pooling_from_wire(req.pooling)?,
        hidden: req.hidden_states,
        rows_per_message: (req.rows_per_message as usize).clamp(1, 1 << 20),
        trace,
    })
}

type EventSender = mpsc::Sender<Result<pb::ShardEvent, Status>>;

fn event(e: pb::shard_event::Event) -> Result<pb::ShardEvent, Status> {
    Ok(pb::ShardEvent { event: Some(e) })
}

/// Runs a checked shard on the calling (compute) thread and reports on `tx`.
fn run_shard(
    hub: &PeerHub,
    gpu: Option<&GpuLease>,
    device: DeviceSpec,
    shard: &Shard,
    tx: &EventSender,
    cancel: &AtomicBool,
    deadline: Option<Instant>,
) -> Result<pb::ShardDone, WorkerError> {
    let started = Instant::now();
    let at = Rendezvous { job: &shard.job, secret: &shard.secret, rank: shard.rank, addresses: &shard.addresses, trace: shard.trace };
    let group = transport::join(hub, shard.transport, gpu, &at)?;
    let total = shard.input.layers_run();
    let mut after_layer = |layer: usize| {
        if shard.rank == 0 {
            let progress = pb::Progress { layers_done: layer as u32 + 1, layers_total: total as u32 };
            if tx.blocking_send(event(pb::shard_event::Event::Progress(progress))).is_err() {
                cancel.store(true, Ordering::Relaxed);
            }
        }
        !cancel.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d)
    };
    let work = RankWork {
        model: &shard.model,
        plan: &shard.plan,
        input: &shard.input,
        spans: &shard.spans,
        pooling: shard.pooling,
        hidden: shard.hidden,
        next_ids: shard.next_ids.as_deref(),
        device,
        gpu_slot: shard.gpu_slot(),
    };
    let out = run_rank(group.group(), &work, &mut after_layer);
    let wire_bytes_sent = group.wire_bytes_sent();
    drop(group);
    let out = match out {
        Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => return Err(WorkerError::DeadlineExceeded),
        Err(_) if cancel.load(Ordering::Relaxed) => return Err(WorkerError::Cancelled),
        other => other?,
    };
    metrics::peer_bytes(out.bytes_sent, wire_bytes_sent);
    if let Some(h) = &out.hidden {
        send_rows(h, shard.rows_per_message, tx, pb::shard_event::Event::HiddenStates)?;
    }
    if let Some(p) = &out.pooled {
        send_rows(p, shard.rows_per_message, tx, pb::shard_event::Event::Pooled)?;
    }
    if let Some(lp) = &out.log_probs {
        send_rows(lp, shard.rows_per_message, tx, pb::shard_event::Event::LogProbs)?;
    }
    Ok(pb::ShardDone { bytes_sent: out.bytes_sent, wire_bytes_sent, compute_seconds: started.elapsed().as_secs_f64() })
}

/// Streams the rows of `t` in blocks (one message would exceed the message limit on a book).
fn send_rows(t: &Tensor, rows_per_message: usize, tx: &EventSender, kind: fn(pb::HiddenStates) -> pb::shard_event::Event) -> Result<(), WorkerError> {
    let rows = t.dim(0)?;
    for start in (0..rows).step_by(rows_per_message) {
        let part = t.narrow(0, start, rows_per_message.min(rows - start))?;
        let states = tensor_to_wire(&part, pb::ElementType::F32).map_err(|e| WorkerError::Internal(e.to_string()))?;
        let msg = pb::HiddenStates { token_start: start as u64, states: Some(states) };
        tx.blocking_send(event(kind(msg))).map_err(|_| WorkerError::Cancelled)?;
    }
    Ok(())
}

/// Unregisters a shard's cancel flag and frees its slot when the shard ends, however it ends.
struct Running {
    job: String,
    flag: Arc<AtomicBool>,
    running: Arc<Mutex<RunningShards>>,
    _permit: OwnedSemaphorePermit,
    _memory: OwnedSemaphorePermit,
    /// The shard's activations on its GPU, where it computes on one.
    _gpu_memory: Option<OwnedSemaphorePermit>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flags) = running.get_mut(&self.job) {
            flags.retain(|(_, f)| !Arc::ptr_eq(f, &self.flag));
            if flags.is_empty() {
                running.remove(&self.job);
            }
        }
        metrics::shard_ended();
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    async fn info(&self, _req: Request<pb::WorkerInfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        // A draining worker is no longer a member: probes of a static list drop it.
        if !self.admitting.load(Ordering::Relaxed) {
            return Err(WorkerError::ShuttingDown(self.config.name.clone()).into());
        }
        Ok(Response::new(WorkerService::info(self)))
    }

    type RunShardStream = Pin<Box<dyn Stream<Item = Result<pb::ShardEvent, Status>> + Send + 'static>>;

    async fn run_shard(&self, req: Request<pb::ShardRequest>) -> Result<Response<Self::RunShardStream>, Status> {
        let timeout = tome_server::grpc_timeout(req.metadata());
        let trace = req.metadata().get(tome_net::traceparent::TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
        if !self.admitting.load(Ordering::Relaxed) {
            return Err(WorkerError::ShuttingDown(self.config.name.clone()).into());
        }
        let mut shard = parse(self, req.into_inner(), trace)?;
        if self.runs_under_another_secret(&shard.job, &shard.secret) {
            return Err(WorkerError::Forbidden(format!("job {} runs on worker {} under another credential", shard.job, self.config.name)).into());
        }
        let permit =
            self.shards.clone().try_acquire_owned().map_err(|_| WorkerError::Busy(format!("worker {} already runs {} shards", self.config.name, self.config.max_shards)))?;
        let need = activation_bytes(&shard.model.model.shape(), &shard.load());
        if need > self.config.memory_budget_bytes {
            return Err(WorkerError::TooLarge(format!(
                "rank {} needs about {need} bytes of activations; worker {} offers {} in all",
                shard.rank, self.config.name, self.config.memory_budget_bytes
            ))
            .into());
        }
        // Never more than the whole budget (rounding up could otherwise make a fitting shard wait
        // for ever).
        let total_kib = ((self.config.memory_budget_bytes / 1024) as usize).min(Semaphore::MAX_PERMITS);
        let need_kib = u32::try_from((need.div_ceil(1024) as usize).min(total_kib)).unwrap_or(u32::MAX);
        let memory = self
            .memory_kib
            .clone()
            .try_acquire_many_owned(need_kib)
            .map_err(|_| WorkerError::Busy(format!("worker {} has no room for {need} more bytes of activations now", self.config.name)))?;
        let gpu_memory = self.admit_on_gpu(&shard)?;
        let computes_on = self.config.device.gpu_for(shard.gpu_slot()).map_err(|e| WorkerError::from(tome_model::ModelError::from(e)))?;
        let gpu = self.gpus.lease(shard.transport, computes_on, &self.config.name)?;
        let flag = Arc::new(AtomicBool::new(false));
        self.lock_running().entry(shard.job.clone()).or_default().push((shard.secret.clone(), flag.clone()));
        metrics::shard_started();
        let running = Running { job: shard.job.clone(), flag: flag.clone(), running: self.running.clone(), _permit: permit, _memory: memory, _gpu_memory: gpu_memory };
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let hub = self.hub.clone();
        let shards_here = self.running.clone();
        let span = info_span!(
            "shard",
            job = %shard.job,
            rank = shard.rank,
            tokens = shard.plan.shard_len(shard.rank),
            trace_id = tracing::field::Empty
        );
        // The rank's peer streams are children of this span in exported traces.
        let trace = tome_net::traceparent::continue_trace(&span, shard.trace);
        span.record("trace_id", trace.trace_id_hex());
        shard.trace = Some(trace);
        // Stops the shard when the coordinator drops the call or the deadline passes, even while
        // the rank waits on a peer; `finished` ends the watch when the shard ends by itself.
        let (finished, watch_finished) = tokio::sync::oneshot::channel::<()>();
        let (watch_tx, watch_flag, watch_hub, watch_job, watch_secret) = (tx.clone(), flag.clone(), self.hub.clone(), shard.job.clone(), shard.secret.clone());
        tokio::spawn(async move {
            let expired = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // A shard that has reported its result is over: the coordinator dropping its
                // call after the last event must not cancel the job's other ranks here.
                biased;
                _ = watch_finished => return,
                _ = watch_tx.closed() => {}
                _ = expired => {}
            }
            watch_flag.store(true, Ordering::Relaxed);
            watch_hub.cancel(&watch_job, &watch_secret);
        });
        let device = self.config.device;
        std::thread::Builder::new()
            .name(format!("tome-shard-{}", shard.rank))
            .spawn(move || {
                let _enter = span.enter();
                let started = Instant::now();
                // A fault in the rank's code ends the shard with an error status, never a
                // stream that ends OK without its result.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_shard(&hub, gpu.as_ref(), device, &shard, &tx, &flag, deadline)))
                    .unwrap_or_else(|_| Err(WorkerError::Internal(format!("rank {} failed unexpectedly; the worker's log has the cause", shard.rank))));
                drop(gpu);
                metrics::shard_seconds(started.elapsed());
                // The shard is over before its last event goes out. Once the coordinator has that
                // event it drops the call — which must not read as a cancel of the job's other
                // ranks here — and may place its next job here at once, into a free slot.
                drop(running);
                let _ = finished.send(());
                match result {
                    Ok(done) => {
                        info!(seconds = done.compute_seconds, bytes = done.bytes_sent, "shard done");
                        let _ = tx.blocking_send(event(pb::shard_event::Event::Done(done)));
                    }
                    Err(e) => {
                        warn!(error = %e, "shard failed");
                        // The job cannot go on without this rank: end the waits of its other
                        // ranks here at once (the coordinator cancels the remote ones).
                        hub.cancel(&shard.job, &shard.secret);
                        let _ = tx.blocking_send(Err(e.into()));
                    }
                }
                // The last shard out hands the heap's freed pages back to the kernel, after its
                // last event: an idle worker holds only its models.
                if shards_here.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                    crate::metrics::release_heap();
                }
            })
            .map_err(|e| WorkerError::Spawn(e.to_string()))?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel(&self, req: Request<pb::CancelRequest>) -> Result<Response<pb::CancelResponse>, Status> {
        let req = req.into_inner();
        let job = req.job_id;
        tome_net::check_job_id(&job).map_err(|e| WorkerError::Invalid(format!("job_id: {e}")))?;
        let secret = JobSecret::from_wire(&req.secret, "secret").map_err(WorkerError::Invalid)?;
        if self.runs_under_another_secret(&job, &secret) {
            return Err(WorkerError::Forbidden(format!("job {job} runs on worker {} under another credential", self.config.name)).into());
        }
        let n = self.cancel_job(&job, &secret);
        if n > 0 {
            info!(%job, shards = n, "cancelled");
        }
        Ok(Response::new(pb::CancelResponse { shards_cancelled: n as u32 }))
    }
}
