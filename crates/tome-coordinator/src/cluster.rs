//! Running a job on worker processes: placement, dispatch, reassembly, cancellation.
//!
//! Placement puts rank r on the r-th live worker that serves the model (fewest shards running
//! first, wrapping around when there are more ranks than workers) and checks each worker's
//! memory budget against the activations of the ranks it would hold. Dispatch sends every rank
//! its `ShardRequest` — its own tokens only — with the job's deadline and trace context; the
//! ranks then talk to each other directly, and only results come back here. The first failure,
//! a caller that leaves or a deadline that passes cancels the job on every worker.
//!
//! A job outlives its workers: when it fails with UNAVAILABLE, the coordinator asks each of its
//! workers whether it is still there; if some are not, it places the job again on the live
//! workers without them and runs it again from the start, up to `attempts` runs within the
//! caller's deadline. The plan (ranks and layout) stays the same, so the outputs are the
//! fault-free run's to the bit; progress already reported is not reported again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tome_net::{tensor_from_wire, TraceParent};
use tome_proto::v1 as pb;
use tome_server::tls::ClientTls;
use tome_worker::transport::{self, Hosts, Transport};
use tome_worker::{activation_bytes, assemble, pool_targets, wire, Gathered, JobEvent, JobOutput, JobSpec, WorkerError};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::error::CoordError;
use crate::membership::Membership;

/// How long the other ranks may take to report after a job has failed (to find the cause).
const DRAIN_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// How long a worker may take to answer whether it is still there after a job failed.
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(2);
/// Runs of one job, the first included, when workers are lost under it.
pub const DEFAULT_JOB_ATTEMPTS: usize = 3;

pub struct Cluster {
    membership: Arc<dyn Membership>,
    channels: Mutex<Channels>,
    /// What this coordinator's jobs in flight hold on each worker (by name): the membership's
    /// figures lag (etcd entries are written once), so placement counts its own.
    reserved: Arc<Mutex<HashMap<String, Load>>>,
    /// Weights each GPU holds for good once a job ran there (a worker keeps a model's weights
    /// on a GPU, per precision, for every later job): by GPU key, then (model, precision).
    resident: Mutex<HashMap<String, ResidentWeights>>,
    max_message_bytes: usize,
    rows_per_message: usize,
    /// Runs of one job, the first included, when workers are lost under it.
    attempts: usize,
}

/// The connections to workers, and the TLS they were made with.
#[derive(Default)]
struct Channels {
    by_address: HashMap<String, Channel>,
    /// TLS for the calls to workers (the cluster CA, this coordinator's certificate), as it
    /// follows its files: connections made before a change are dropped, so new calls present
    /// the new certificate.
    tls: Option<ClientTls>,
}

#[derive(Clone, Copy, Default, Debug)]
struct Load {
    bytes: u64,
    shards: u32,
}

/// A job's ranks placed on workers; holds their share of the workers until dropped.
pub struct Placement {
    pub workers: Vec<pb::WorkerInfo>,
    /// How the ranks talk, chosen from where they run.
    pub transport: Transport,
    held: Vec<(String, Load)>,
    reserved: Arc<Mutex<HashMap<String, Load>>>,
}

impl Drop for Placement {
    fn drop(&mut self) {
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        for (name, load) in &self.held {
            if let Some(r) = reserved.get_mut(name) {
                r.bytes = r.bytes.saturating_sub(load.bytes);
                r.shards = r.shards.saturating_sub(load.shards);
            }
        }
    }
}

/// The weights a GPU holds, by (model, precision).
type ResidentWeights = HashMap<(String, String), u64>;

/// What a job's ranks need of one GPU of a worker whose ranks compute on GPUs.
struct GpuNeed {
    /// The GPU's key among the reservations.
    key: String,
    worker: String,
    gpu: u32,
    /// The job's model and precision, and their weights there.
    weights_of: (String, String),
    model_weights: u64,
    /// Every weight the GPU would hold: those resident there and the job's model's.
    weights: u64,
    /// The job's ranks' activations there at their peak.
    activations: u64,
    /// What a plan may fill of the GPU's memory.
    capacity: u64,
}

/// Why one placement failed: a worker busy with other jobs now (the job may fit on the others),
/// or anything else.
enum Refusal {
    Busy { worker: String, why: String },
    Other(CoordError),
}

fn refused<T>(e: CoordError) -> Result<T, Refusal> {
    Err(Refusal::Other(e))
}

impl From<CoordError> for Refusal {
    fn from(e: CoordError) -> Self {
        Refusal::Other(e)
    }
}

/// What activations other jobs hold on GPU `key`.
fn held_gpu(reserved: &HashMap<String, Load>, key: &str) -> Load {
    reserved.get(key).copied().unwrap_or_default()
}

/// Each GPU's share of `spec` with rank r on `workers[r]`: a GPU worker puts its k-th rank of
/// the job on `rank_gpus[k mod their count]`, and its model's measured footprint in the job's
/// precision gives the weights and each rank's activations by its tokens. A GPU that could not
/// hold them even alone is refused, naming the worker and the GPU (RESOURCE_EXHAUSTED). Workers
/// that measured no footprint (CPU ranks, or from before footprints), or whose Info does not
/// list the GPU, are not planned here.
fn gpu_needs(spec: &JobSpec, workers: &[pb::WorkerInfo], resident: &HashMap<String, ResidentWeights>) -> Result<Vec<GpuNeed>, CoordError> {
    let (model, precision) = (spec.model.name(), spec.doc.run.precision);
    let weights_of = (model.clone(), precision.name().to_string());
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let mut needs: Vec<(GpuNeed, u32)> = Vec::new();
    for (r, w) in workers.iter().enumerate() {
        let footprint = w.models.iter().filter(|m| m.name == model).flat_map(|m| &m.gpu_footprints).find(|f| f.precision == precision.name());
        let (Some(f), false) = (footprint, w.rank_gpus.is_empty()) else { continue };
        // The worker's ranks of the job take its GPUs in turn.
        let slot = workers.iter().take(r).filter(|x| x.name == w.name).count();
        let gpu = w.rank_gpus[slot % w.rank_gpus.len()];
        let Some(memory) = w.gpus.iter().find(|g| g.index == gpu).map(|g| g.memory_bytes) else { continue };
        let key = format!("{}#cuda:{gpu}", w.name);
        let activations = f.rank_base_bytes.saturating_add(f.rank_bytes_per_token.saturating_mul(spec.plan.shard_len(r) as u64));
        match needs.iter_mut().find(|(n, _)| n.key == key) {
            Some((n, ranks)) => {
                n.activations = n.activations.saturating_add(activations);
                *ranks += 1;
            }
            None => {
                let capacity = memory / 100 * tome_worker::GPU_PLANNED_PERCENT;
                let held = resident.get(&key);
                let others: u64 = held.map_or(0, |h| h.iter().filter(|(k, _)| **k != weights_of).map(|(_, b)| *b).sum());
                let weights = others.saturating_add(f.weight_bytes);
                needs.push((GpuNeed { key, worker: w.name.clone(), gpu, weights_of: weights_of.clone(), model_weights: f.weight_bytes, weights, activations, capacity }, 1));
            }
        }
    }
    if let Some((n, ranks)) = needs.iter().find(|(n, _)| n.weights.saturating_add(n.activations) > n.capacity) {
        return Err(CoordError::Exhausted(format!(
            "the job needs about {:.2} GiB on GPU cuda:{} of worker {} ({:.2} GiB of {model}'s {precision} weights, {:.2} GiB of other weights resident there and {ranks} ranks' activations of {:.2} GiB), past the {:.2} GiB a plan fills there: spread it over more GPUs or send a shorter document",
            gib(n.weights.saturating_add(n.activations)),
            n.gpu,
            n.worker,
            gib(n.model_weights),
            gib(n.weights - n.model_weights),
            gib(n.activations),
            gib(n.capacity)
        )));
    }
    Ok(needs.into_iter().map(|(n, _)| n).collect())
}

/// Whether worker `w` runs `model` in `precision` on its device (its own `ModelInfo` says: CPU
/// ranks in `precisions`, where a worker from before that list runs f32; GPU ranks in
/// `gpu_precisions`, empty for a model without a GPU path).
fn runs_in(w: &pb::WorkerInfo, model: &str, precision: tome_attn::Precision) -> bool {
    w.models.iter().any(|m| {
        let listed = |offered: &[String]| offered.iter().any(|p| p == precision.name());
        m.name == model
            && match (w.gpu_ranks, m.precisions.is_empty()) {
                (true, _) => listed(&m.gpu_precisions),
                (false, true) => precision == tome_attn::Precision::F32,
                (false, false) => listed(&m.precisions),
            }
    })
}

impl Cluster {
    pub fn new(membership: Arc<dyn Membership>, max_message_bytes: usize, rows_per_message: usize) -> Self {
        Cluster {
            membership,
            channels: Mutex::default(),
            reserved: Arc::default(),
            resident: Mutex::default(),
            max_message_bytes,
            rows_per_message,
            attempts: DEFAULT_JOB_ATTEMPTS,
        }
    }

    /// Calls workers over TLS with `tls` (plaintext with `None`).
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.channels.get_mut().unwrap_or_else(|p| p.into_inner()).tls = tls;
        self
    }

    /// Runs one job at most `attempts` times (at least once) when workers are lost under it.
    pub fn with_attempts(mut self, attempts: usize) -> Self {
        self.attempts = attempts.max(1);
        self
    }

    pub fn live(&self) -> Vec<pb::WorkerInfo> {
        self.membership.live()
    }

    /// Chooses a worker for every rank of `spec`: the workers serving the model, those this
    /// coordinator keeps least busy first, each within its shard limit and memory budget
    /// (counting what this coordinator's other jobs hold there).
    pub fn place(&self, spec: &JobSpec) -> Result<Placement, CoordError> {
        self.place_without(spec, &HashSet::new())
    }

    /// As [`Cluster::place`], on the live workers other than those named in `lost`. A worker,
    /// or a GPU of one, too busy with other jobs now is left out and the job placed on the
    /// others; the job is refused as busy (naming the first) only when no placement without
    /// them holds.
    fn place_without(&self, spec: &JobSpec, lost: &HashSet<String>) -> Result<Placement, CoordError> {
        let mut left_out = lost.clone();
        let mut first_busy: Option<CoordError> = None;
        loop {
            match self.place_once(spec, &left_out) {
                Ok(placement) => return Ok(placement),
                Err(Refusal::Busy { worker, why }) => {
                    first_busy.get_or_insert(CoordError::Busy(why));
                    left_out.insert(worker);
                }
                Err(Refusal::Other(e)) => return Err(first_busy.unwrap_or(e)),
            }
        }
    }

    /// One placement on the live workers other than those in `left_out`.
    fn place_once(&self, spec: &JobSpec, lost: &HashSet<String>) -> Result<Placement, Refusal> {
        let model = spec.model.name();
        let serving: Vec<pb::WorkerInfo> = self.membership.live().into_iter().filter(|w| !lost.contains(&w.name) && w.models.iter().any(|m| m.name == model)).collect();
        if serving.is_empty() {
            return refused(CoordError::Unavailable(format!("no live worker serves model `{model}`")));
        }
        // A pool may mix CPU and GPU workers: each runs the model in what its device offers.
        let precision = spec.doc.run.precision;
        let (mut live, unable): (Vec<pb::WorkerInfo>, Vec<pb::WorkerInfo>) = serving.into_iter().partition(|w| runs_in(w, &model, precision));
        if live.is_empty() {
            let names: Vec<String> = unable.iter().map(|w| format!("{} ({})", w.name, if w.gpu_ranks { "GPU ranks" } else { "CPU ranks" })).collect();
            return refused(CoordError::Invalid(format!("no live worker runs model `{model}` in {precision}: {} serve it in other precisions", names.join(", "))));
        }
        let mut reserved = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        let held = |w: &pb::WorkerInfo| reserved.get(&w.name).copied().unwrap_or_default();
        live.sort_by(|a, b| held(a).shards.cmp(&held(b).shards).then_with(|| a.name.cmp(&b.name)));
        let ranks = spec.plan.ranks();
        let workers: Vec<pb::WorkerInfo> = (0..ranks).map(|r| live[r % live.len()].clone()).collect();
        let shape = spec.model.model.shape();
        let mut need: HashMap<String, Load> = HashMap::new();
        for (r, w) in workers.iter().enumerate() {
            let e = need.entry(w.name.clone()).or_default();
            e.bytes += activation_bytes(&shape, &spec.rank_load(r));
            e.shards += 1;
        }
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        for w in &live {
            let Some(n) = need.get(&w.name) else { continue };
            if n.bytes > w.memory_budget_bytes || n.shards > w.max_shards {
                return refused(CoordError::Exhausted(format!(
                    "the job needs {} ranks and about {:.2} GiB of activations on worker {}, which runs at most {} shards in {:.2} GiB: ask for fewer ranks or add workers",
                    n.shards,
                    gib(n.bytes),
                    w.name,
                    w.max_shards,
                    gib(w.memory_budget_bytes)
                )));
            }
            let h = held(w);
            if h.bytes + n.bytes > w.memory_budget_bytes || h.shards + n.shards > w.max_shards {
                return Err(Refusal::Busy { worker: w.name.clone(), why: format!("worker {} is busy with other jobs; retry later", w.name) });
            }
        }
        // Each GPU's memory: the weights there (those already resident and the model's), and
        // the activations of the ranks it would hold, from what its worker measured, beside what
        // other jobs hold.
        let mut resident = self.resident.lock().unwrap_or_else(|p| p.into_inner());
        let gpus = gpu_needs(spec, &workers, &resident)?;
        for g in &gpus {
            if g.weights + held_gpu(&reserved, &g.key).bytes + g.activations > g.capacity {
                return Err(Refusal::Busy { worker: g.worker.clone(), why: format!("GPU cuda:{} of worker {} is busy with other jobs; retry later", g.gpu, g.worker) });
            }
        }
        for g in gpus {
            resident.entry(g.key.clone()).or_default().insert(g.weights_of.clone(), g.model_weights);
            need.insert(g.key, Load { bytes: g.activations, shards: 0 });
        }
        drop(resident);
        let held: Vec<(String, Load)> = need.into_iter().collect();
        for (name, load) in &held {
            let r = reserved.entry(name.clone()).or_default();
            r.bytes += load.bytes;
            r.shards += load.shards;
        }
        let transport = transport::choose(Hosts::Workers(&workers));
        Ok(Placement { workers, transport, held, reserved: self.reserved.clone() })
    }

    /// The connection to the worker at `address`, made once and kept while the worker is a
    /// member: workers come and go (a Kubernetes pod gets a new address each time), so
    /// connections to addresses that left the membership are dropped whenever a new one is made.
    fn channel(&self, address: &str) -> Result<Channel, WorkerError> {
        let mut guard = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channels = &mut *guard;
        if let Some(tls) = channels.tls.as_mut() {
            if tls.has_changed().unwrap_or(false) {
                tls.mark_unchanged();
                channels.by_address.clear();
            }
        }
        if let Some(c) = channels.by_address.get(address) {
            return Ok(c.clone());
        }
        let live = self.membership.live();
        channels.by_address.retain(|a, _| live.iter().any(|w| &w.address == a));
        let tls = channels.tls.as_ref().map(|t| t.borrow().clone());
        let endpoint = tome_server::tls::endpoint(address, tls.as_ref())
            .map_err(|e| WorkerError::Internal(format!("worker address {address}: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            // A worker whose host went silent (no reset) fails its ranks' calls within seconds.
            .http2_keep_alive_interval(tome_net::PEER_KEEPALIVE)
            .keep_alive_timeout(tome_net::PEER_KEEPALIVE)
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        channels.by_address.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    fn client(&self, address: &str) -> Result<pb::worker_client::WorkerClient<Channel>, WorkerError> {
        Ok(pb::worker_client::WorkerClient::new(self.channel(address)?).max_decoding_message_size(self.max_message_bytes).max_encoding_message_size(self.max_message_bytes))
    }

    /// Runs the job; its events (progress, then the outputs or an error) arrive on `events`.
    /// Dropping the receiver cancels the job on every worker.
    pub fn spawn(
        self: &Arc<Self>,
        job_id: String,
        spec: JobSpec,
        placement: Placement,
        events: mpsc::Sender<Result<JobEvent, WorkerError>>,
        deadline: Option<Instant>,
        trace: TraceParent,
    ) {
        let cluster = self.clone();
        tokio::spawn(async move {
            let result = cluster.run_to_the_end(&job_id, &spec, placement, &events, deadline, trace).await;
            if let Err(e) = &result {
                warn!(job = %job_id, error = %e, "job failed");
            }
            let _ = events.send(result.map(JobEvent::Finished)).await;
        });
    }

    /// Runs the job, and again on the live workers when workers were lost under it.
    async fn run_to_the_end(
        &self,
        job_id: &str,
        spec: &JobSpec,
        mut placement: Placement,
        events: &mpsc::Sender<Result<JobEvent, WorkerError>>,
        deadline: Option<Instant>,
        trace: TraceParent,
    ) -> Result<JobOutput, WorkerError> {
        let reported = Arc::new(AtomicUsize::new(0));
        let mut lost: HashSet<String> = HashSet::new();
        let mut attempt = 1;
        loop {
            // Each run is a job of its own to the workers: a cancelled run's id stays refused.
            let run_id = if attempt == 1 { job_id.to_string() } else { format!("{job_id}.{attempt}") };
            let error = match self.run(&run_id, spec, &placement, events, &reported, deadline, trace).await {
                Ok(out) => return Ok(out),
                Err(e) => e,
            };
            let time_left = deadline.is_none_or(|d| Instant::now() < d);
            if error.code() != tonic::Code::Unavailable || attempt >= self.attempts || events.is_closed() || !time_left {
                return Err(error);
            }
            let gone = self.absent(&placement.workers).await;
            if gone.is_empty() {
                return Err(error);
            }
            warn!(job = %job_id, attempt, lost = ?gone, %error, "workers were lost mid-job; running it again on the live workers");
            crate::metrics::job_rerun();
            lost.extend(gone);
            drop(placement);
            placement = match self.place_without(spec, &lost) {
                Ok(p) => p,
                Err(e) => return Err(WorkerError::Remote(tonic::Status::unavailable(format!("{error}; the live workers cannot take the job again: {e}")))),
            };
            attempt += 1;
        }
    }

    /// The workers among `workers` that do not answer now (dead, unreachable or draining).
    async fn absent(&self, workers: &[pb::WorkerInfo]) -> Vec<String> {
        let mut distinct: Vec<&pb::WorkerInfo> = workers.iter().collect();
        distinct.sort_by(|a, b| a.name.cmp(&b.name));
        distinct.dedup_by(|a, b| a.name == b.name);
        let mut probes = JoinSet::new();
        for w in distinct {
            let (name, client) = (w.name.clone(), self.client(&w.address));
            probes.spawn(async move {
                let answered = match client {
                    Ok(mut c) => {
                        let mut req = tonic::Request::new(pb::WorkerInfoRequest {});
                        req.set_timeout(PRESENCE_TIMEOUT);
                        tokio::time::timeout(PRESENCE_TIMEOUT, c.info(req)).await.is_ok_and(|r| r.is_ok())
                    }
                    Err(_) => false,
                };
                (!answered).then_some(name)
            });
        }
        let mut gone = Vec::new();
        while let Some(next) = probes.join_next().await {
            if let Ok(Some(name)) = next {
                gone.push(name);
            }
        }
        gone.sort();
        gone
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        job_id: &str,
        spec: &JobSpec,
        placement: &Placement,
        events: &mpsc::Sender<Result<JobEvent, WorkerError>>,
        reported: &Arc<AtomicUsize>,
        deadline: Option<Instant>,
        trace: TraceParent,
    ) -> Result<JobOutput, WorkerError> {
        let started = Instant::now();
        // A credential of this run alone: its ranks' streams and its cancels prove it.
        let secret = tome_net::JobSecret::random();
        let (tokens, shards) = wire::plan_to_wire(&spec.plan);
        let addresses: Vec<String> = placement.workers.iter().map(|w| w.address.clone()).collect();
        let plan = pb::JobPlan {
            job_id: job_id.to_string(),
            tokens,
            shards,
            rank_addresses: addresses.clone(),
            traceparent: trace.to_string(),
            transport: wire::transport_to_wire(placement.transport)? as i32,
            secret: secret.to_wire(),
        };
        let spans = wire::spans_to_wire(&pool_targets(spec.doc.len(), spec.document, &spec.chunks));
        let layers: Vec<pb::AttentionOverride> = spec.doc.layers.iter().map(|&l| wire::layer_to_wire(l)).collect();
        let mut ranks = JoinSet::new();
        for (r, address) in addresses.iter().enumerate() {
            let input = spec.doc.shard(&spec.plan, r);
            let req = pb::ShardRequest {
                plan: Some(plan.clone()),
                rank: r as u32,
                model: spec.model.name(),
                token_ids: Some(wire::u32s_to_wire(&input.ids)?),
                position_ids: Some(wire::u32s_to_wire(&input.position_ids)?),
                layers: layers.clone(),
                global_tokens: input.global_tokens.iter().map(|&g| g as u64).collect(),
                pool_spans: spans.clone(),
                pooling: wire::pooling_to_wire(spec.pooling) as i32,
                hidden_states: spec.hidden,
                rows_per_message: self.rows_per_message as u32,
                log_probs: spec.log_probs,
                output_layer: input.run.output_layer.map(|k| k as u32),
                segment_len: input.run.segment_len.unwrap_or(0) as u32,
                precision: wire::precision_to_wire(input.run.precision) as i32,
                next_ids: if spec.log_probs { Some(wire::u32s_to_wire(&spec.doc.next_ids(&spec.plan, r))?) } else { None },
            };
            let mut request = tonic::Request::new(req);
            if let Some(d) = deadline {
                request.set_timeout(d.saturating_duration_since(Instant::now()));
            }
            if let Ok(v) = MetadataValue::try_from(trace.child().to_string()) {
                request.metadata_mut().insert(tome_net::traceparent::TRACEPARENT, v);
            }
            let client = self.client(address)?;
            let progress = (r == 0).then(|| Progress { events: events.clone(), reported: reported.clone() });
            let worker = address.clone();
            ranks.spawn(async move { (r, run_remote_rank(client, request, progress).await.map_err(|e| at_rank(e, r, &worker))) });
        }
        let expired = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        let mut results: Vec<Option<RemoteRank>> = (0..addresses.len()).map(|_| None).collect();
        let failure = loop {
            tokio::select! {
                next = ranks.join_next() => match next {
                    None => break None,
                    Some(Ok((r, Ok(out)))) => results[r] = Some(out),
                    Some(Ok((_, Err(e)))) => break Some(e),
                    Some(Err(e)) => break Some(WorkerError::Internal(format!("a rank's task failed: {e}"))),
                },
                _ = events.closed() => break Some(WorkerError::Cancelled),
                _ = &mut expired => break Some(WorkerError::DeadlineExceeded),
            }
        };
        if let Some(first) = failure {
            self.cancel(job_id, &secret, &addresses).await;
            return Err(cause(first, &mut ranks).await);
        }
        let mut gathered = Gathered::default();
        let (mut hidden, mut log_probs) = (Vec::new(), Vec::new());
        let (mut bytes, mut wire_bytes) = (0, 0);
        for r in results.into_iter().flatten() {
            bytes += r.done.bytes_sent;
            wire_bytes += r.done.wire_bytes_sent;
            if r.pooled.is_some() {
                gathered.pooled = r.pooled;
            }
            hidden.push(r.hidden);
            log_probs.push(r.log_probs);
        }
        // An empty shard (or one whose only token is the last) sends no rows.
        if spec.hidden {
            let width = spec.model.model.shape().hidden_size;
            let empty = Tensor::zeros((0, width), candle_core::DType::F32, &candle_core::Device::Cpu)?;
            gathered.hidden = Some(hidden.into_iter().map(|h| h.unwrap_or_else(|| empty.clone())).collect());
        }
        if spec.log_probs {
            let empty = Tensor::zeros(0, candle_core::DType::F32, &candle_core::Device::Cpu)?;
            gathered.log_probs = Some(log_probs.into_iter().map(|l| l.unwrap_or_else(|| empty.clone())).collect());
        }
        // Putting a book's hidden states back in order is compute: off the async runtime.
        let (plan, document, chunks, normalize) = (spec.plan.clone(), spec.document, spec.chunks.len(), spec.normalize);
        let a = tokio::task::spawn_blocking(move || assemble(&plan, document, chunks, normalize, gathered))
            .await
            .map_err(|e| WorkerError::Internal(format!("assembling the outputs failed: {e}")))??;
        info!(job = %job_id, ranks = addresses.len(), transport = placement.transport.name(), bytes, wire_bytes, "cluster job done");
        Ok(JobOutput {
            document: a.document,
            chunks: a.chunks,
            hidden: a.hidden,
            log_probs: a.log_probs,
            perplexity: a.perplexity,
            bytes_exchanged: bytes,
            wire_bytes_exchanged: wire_bytes,
            compute: started.elapsed(),
        })
    }

    /// Asks every worker of the job to stop it (best effort: a worker that is gone has stopped).
    async fn cancel(&self, job_id: &str, secret: &tome_net::JobSecret, addresses: &[String]) {
        let mut distinct = addresses.to_vec();
        distinct.sort();
        distinct.dedup();
        let mut calls = JoinSet::new();
        for a in distinct {
            if let Ok(mut client) = self.client(&a) {
                let cancel = pb::CancelRequest { job_id: job_id.to_string(), secret: secret.to_wire() };
                calls.spawn(async move {
                    let mut req = tonic::Request::new(cancel);
                    req.set_timeout(Duration::from_secs(5));
                    if let Err(status) = client.cancel(req).await {
                        warn!(worker = %a, %status, "could not cancel on a worker");
                    }
                });
            }
        }
        while calls.join_next().await.is_some() {}
    }
}

/// The root cause among a failed job's errors: the first that is not a consequence (another
/// rank gone, or cancelled because of the failure), waiting briefly for the other ranks.
async fn cause(first: WorkerError, ranks: &mut JoinSet<(usize, Result<RemoteRank, WorkerError>)>) -> WorkerError {
    if !first.is_peer_failure() && !first.is_cancelled() {
        ranks.abort_all();
        return first;
    }
    let drain = async {
        while let Some(next) = ranks.join_next().await {
            if let Ok((_, Err(e))) = next {
                if !e.is_peer_failure() && !e.is_cancelled() {
                    return Some(e);
                }
            }
        }
        None
    };
    let found = tokio::time::timeout(DRAIN_AFTER_FAILURE, drain).await.ok().flatten();
    ranks.abort_all();
    found.unwrap_or(first)
}

/// A worker's answer with the rank and worker it came from in front of its message; the code and
/// metadata (`retry-after`) stay as they were.
fn at_rank(e: WorkerError, rank: usize, worker: &str) -> WorkerError {
    match e {
        WorkerError::Remote(s) => WorkerError::Remote(tonic::Status::with_metadata(s.code(), format!("rank {rank} on worker {worker}: {}", s.message()), s.metadata().clone())),
        other => other,
    }
}

/// A worker's status as this job's error. A broken connection (the worker died or the
/// network failed) arrives as UNKNOWN; it is UNAVAILABLE to the caller: retry elsewhere.
fn remote(status: tonic::Status) -> WorkerError {
    if status.code() == tonic::Code::Unknown {
        return WorkerError::Remote(tonic::Status::unavailable(format!("a worker failed mid-job: {}", status.message())));
    }
    WorkerError::Remote(status)
}

struct RemoteRank {
    done: pb::ShardDone,
    hidden: Option<Tensor>,
    pooled: Option<Tensor>,
    log_probs: Option<Tensor>,
}

/// Appends a streamed block of rows, checking it follows the previous ones.
fn push_rows(blocks: &mut Vec<Tensor>, rows: &mut usize, msg: &pb::HiddenStates) -> Result<(), WorkerError> {
    let t = msg.states.as_ref().ok_or_else(|| WorkerError::Internal("a block of rows without a tensor".into()))?;
    let t = tensor_from_wire(t).map_err(|e| WorkerError::Internal(format!("a worker sent a malformed tensor: {e}")))?;
    if msg.token_start as usize != *rows {
        return Err(WorkerError::Internal(format!("rows out of order: from {} after {}", msg.token_start, rows)));
    }
    *rows += t.dim(0)?;
    blocks.push(t);
    Ok(())
}

fn concat(blocks: &[Tensor]) -> Result<Option<Tensor>, WorkerError> {
    Ok(if blocks.is_empty() { None } else { Some(Tensor::cat(blocks, 0)?) })
}

/// Where rank 0 reports a job's progress, and the most layers reported so far (by any run of
/// the job: a run after a lost worker reports only beyond it).
struct Progress {
    events: mpsc::Sender<Result<JobEvent, WorkerError>>,
    reported: Arc<AtomicUsize>,
}

async fn run_remote_rank(
    mut client: pb::worker_client::WorkerClient<Channel>,
    request: tonic::Request<pb::ShardRequest>,
    progress: Option<Progress>,
) -> Result<RemoteRank, WorkerError> {
    let mut stream = client.run_shard(request).await.map_err(remote)?.into_inner();
    let (mut hidden, mut hidden_rows) = (Vec::new(), 0);
    let (mut pooled, mut pooled_rows) = (Vec::new(), 0);
    let (mut log_probs, mut scored) = (Vec::new(), 0);
    while let Some(ev) = stream.message().await.map_err(remote)? {
        match ev.event {
            Some(pb::shard_event::Event::Progress(p)) => {
                let done = p.layers_done as usize;
                if let Some(progress) = progress.as_ref().filter(|pr| pr.reported.fetch_max(done, Ordering::Relaxed) < done) {
                    let _ = progress.events.send(Ok(JobEvent::Progress { done, total: p.layers_total as usize })).await;
                }
            }
            Some(pb::shard_event::Event::HiddenStates(h)) => push_rows(&mut hidden, &mut hidden_rows, &h)?,
            Some(pb::shard_event::Event::Pooled(p)) => push_rows(&mut pooled, &mut pooled_rows, &p)?,
            Some(pb::shard_event::Event::LogProbs(l)) => push_rows(&mut log_probs, &mut scored, &l)?,
            Some(pb::shard_event::Event::Done(done)) => return Ok(RemoteRank { done, hidden: concat(&hidden)?, pooled: concat(&pooled)?, log_probs: concat(&log_probs)? }),
            None => {}
        }
    }
    Err(WorkerError::Remote(tonic::Status::unavailable("the worker ended the shard without a result")))
}

#[cfg(test)]
mod tests {
    use tokio::sync::watch;

    use super::*;

    struct Members(watch::Sender<Vec<pb::WorkerInfo>>);

    impl Membership for Members {
        fn subscribe(&self) -> watch::Receiver<Vec<pb::WorkerInfo>> {
            self.0.subscribe()
        }
    }

    fn worker(address: &str) -> pb::WorkerInfo {
        pb::WorkerInfo { name: address.to_string(), address: address.to_string(), ..Default::default() }
    }

    #[tokio::test]
    async fn connections_to_workers_that_left_are_dropped() {
        let (tx, _rx) = watch::channel(vec![worker("10.0.0.1:7001"), worker("10.0.0.2:7001")]);
        let members = Arc::new(Members(tx));
        let cluster = Cluster::new(members.clone(), 1 << 20, 1024);
        cluster.channel("10.0.0.1:7001").unwrap();
        cluster.channel("10.0.0.2:7001").unwrap();
        // The first pod is replaced by one at a new address.
        members.0.send_replace(vec![worker("10.0.0.2:7001"), worker("10.0.0.3:7001")]);
        cluster.channel("10.0.0.3:7001").unwrap();
        let mut kept: Vec<String> = cluster.channels.lock().unwrap().by_address.keys().cloned().collect();
        kept.sort();
        assert_eq!(kept, ["10.0.0.2:7001", "10.0.0.3:7001"]);
    }

    fn job(ranks: usize) -> JobSpec {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tome-model/tests/fixtures/bert-tiny");
        let model = Arc::new(tome_model::ModelDir::open(&dir).unwrap());
        let doc = Arc::new(model.model.prepare(vec![5; 16], &tome_model::EncodeOptions::default()).unwrap());
        JobSpec::new(model, doc, ranks, tome_dist::Layout::Contiguous).unwrap()
    }

    fn serving(name: &str, model: &str, nccl_gpus: u32) -> pb::WorkerInfo {
        let models = vec![pb::ModelInfo { name: model.into(), ..Default::default() }];
        pb::WorkerInfo { nccl_gpus, models, memory_budget_bytes: 1 << 30, max_shards: 8, ..worker(name) }
    }

    #[test]
    fn a_busy_worker_is_left_out_and_the_job_placed_on_the_others() {
        let model = job(1).model.name();
        let (tx, _rx) = watch::channel(vec![pb::WorkerInfo { max_shards: 1, ..serving("a", &model, 0) }, pb::WorkerInfo { max_shards: 2, ..serving("b", &model, 0) }]);
        let cluster = Cluster::new(Arc::new(Members(tx)), 1 << 20, 1024);
        let names = |p: &Placement| p.workers.iter().map(|w| w.name.clone()).collect::<Vec<_>>();
        let first = cluster.place(&job(1)).unwrap();
        assert_eq!(names(&first), ["a"]);
        // a holds its one shard: both ranks of the next job go to b rather than the job waiting.
        let second = cluster.place(&job(2)).unwrap();
        assert_eq!(names(&second), ["b", "b"]);
        let Err(CoordError::Busy(busy)) = cluster.place(&job(2)) else { panic!("a job was placed on workers with no room") };
        assert!(busy.contains("is busy with other jobs"), "{busy}");
        drop(first);
        assert_eq!(names(&cluster.place(&job(1)).unwrap()), ["a"]);
    }

    #[test]
    fn placement_chooses_nccl_only_when_every_rank_gets_a_gpu_of_its_own() {
        let spec = job(4);
        let model = spec.model.name();
        let chosen = |workers: Vec<pb::WorkerInfo>| {
            let (tx, _rx) = watch::channel(workers);
            Cluster::new(Arc::new(Members(tx)), 1 << 20, 1024).place(&spec).unwrap().transport
        };
        assert_eq!(chosen(vec![serving("a", &model, 2), serving("b", &model, 2)]), Transport::Nccl);
        assert_eq!(chosen(vec![serving("a", &model, 2), serving("b", &model, 1)]), Transport::PeerStreams, "b would hold two ranks on one GPU");
        assert_eq!(chosen(vec![serving("a", &model, 0), serving("b", &model, 0)]), Transport::PeerStreams);
        let one_rank = job(1);
        let (tx, _rx) = watch::channel(vec![serving("a", &model, 8)]);
        assert_eq!(Cluster::new(Arc::new(Members(tx)), 1 << 20, 1024).place(&one_rank).unwrap().transport, Transport::PeerStreams, "one rank exchanges nothing");
    }

    #[test]
    fn a_mixed_pool_places_each_job_on_the_workers_that_run_its_precision() {
        let mut f16 = job(2);
        let mut doc = (*f16.doc).clone();
        doc.run.precision = tome_attn::Precision::F16;
        f16.doc = Arc::new(doc);
        let model = f16.model.name();
        let on = |name: &str, gpu_ranks: bool| {
            let models = vec![pb::ModelInfo {
                name: model.clone(),
                precisions: vec!["f32".into(), "bf16".into()],
                gpu_precisions: vec!["f32".into(), "bf16".into(), "f16".into()],
                ..Default::default()
            }];
            pb::WorkerInfo { gpu_ranks, models, memory_budget_bytes: 1 << 30, max_shards: 8, ..worker(name) }
        };
        let place = |workers: Vec<pb::WorkerInfo>, spec: &JobSpec| {
            let (tx, _rx) = watch::channel(workers);
            Cluster::new(Arc::new(Members(tx)), 1 << 20, 1024).place(spec).map(|p| p.workers.iter().map(|w| w.name.clone()).collect::<Vec<_>>())
        };
        assert_eq!(place(vec![on("cpu", false), on("gpu", true)], &f16).unwrap(), ["gpu", "gpu"], "f16 goes to the GPU worker alone");
        assert_eq!(place(vec![on("cpu", false), on("gpu", true)], &job(2)).unwrap().len(), 2);
        let Err(CoordError::Invalid(refused)) = place(vec![on("cpu", false)], &f16) else { panic!("f16 placed on CPU ranks") };
        assert!(refused.contains("in f16") && refused.contains("cpu (CPU ranks)"), "{refused}");
        // A model without a GPU path (no gpu_precisions) goes to CPU workers alone.
        let no_gpu_path = |name: &str, gpu_ranks: bool| pb::WorkerInfo {
            models: vec![pb::ModelInfo { name: model.clone(), precisions: vec!["f32".into()], ..Default::default() }],
            ..on(name, gpu_ranks)
        };
        assert_eq!(place(vec![no_gpu_path("cpu", false), no_gpu_path("gpu", true)], &job(2)).unwrap(), ["cpu", "cpu"]);
    }

    #[test]
    fn gpu_memory_is_planned_per_gpu_from_the_measured_footprint_and_refusals_name_the_worker() {
        const MIB: u64 = 1 << 20;
        let spec = job(2); // 16 tokens: 8 a rank
        let model = spec.model.name();
        // A worker with two GPUs of 1000 MiB (900 planned), its ranks on both (rank r on GPU r mod 2)
        // or on one; weights 100 MiB, each rank 10 MiB + per_token · 8.
        let gpu_worker = |name: &str, rank_gpus: Vec<u32>, per_token: u64| {
            let footprint = pb::GpuFootprint { precision: "f32".into(), weight_bytes: 100 * MIB, rank_base_bytes: 10 * MIB, rank_bytes_per_token: per_token };
            let models = vec![pb::ModelInfo {
                name: model.clone(),
                precisions: vec!["f32".into()],
                gpu_precisions: vec!["f32".into()],
                gpu_footprints: vec![footprint],
                ..Default::default()
            }];
            let gpus = (0..2).map(|index| pb::GpuDevice { index, name: "H100".into(), memory_bytes: 1000 * MIB, compute_capability: "9.0".into() }).collect();
            pb::WorkerInfo { gpu_ranks: true, rank_gpus, gpus, models, memory_budget_bytes: 1 << 30, max_shards: 8, ..worker(name) }
        };
        let cluster = |w: pb::WorkerInfo| {
            let (tx, _rx) = watch::channel(vec![w]);
            Cluster::new(Arc::new(Members(tx)), 1 << 20, 1024)
        };
        // 100 + 10 + 8 · 40 = 430 MiB a GPU on two GPUs: fits; on one GPU 100 + 2 · 330 = 760: fits once.
        let c = cluster(gpu_worker("g", vec![0, 1], 40 * MIB));
        let _a = c.place(&spec).unwrap();
        let _b = c.place(&spec).unwrap();
        let one = cluster(gpu_worker("g", vec![1], 40 * MIB));
        let first = one.place(&spec).unwrap();
        let Err(CoordError::Busy(busy)) = one.place(&spec) else { panic!("a GPU was planned past its memory") };
        assert!(busy.contains("cuda:1") && busy.contains("worker g"), "{busy}");
        drop(first);
        one.place(&spec).expect("the first job's share is given back");
        // Two ranks of 10 + 8 · 60 MiB beside 100 MiB of weights: 1080 MiB on one GPU of 900 planned.
        let big = cluster(gpu_worker("g", vec![0], 60 * MIB));
        let Err(CoordError::Exhausted(refused)) = big.place(&spec) else { panic!("a job past a GPU's memory was placed") };
        assert!(refused.contains("GPU cuda:0 of worker g") && refused.contains("2 ranks") && refused.contains("f32 weights"), "{refused}");
        // No footprint measured for the job's precision: not planned here (the worker refuses what does not fit).
        let mut bf16 = job(2);
        let mut doc = (*bf16.doc).clone();
        doc.run.precision = tome_attn::Precision::Bf16;
        bf16.doc = Arc::new(doc);
        let mut w = gpu_worker("g", vec![0], 60 * MIB);
        w.models[0].gpu_precisions.push("bf16".into());
        let unmeasured = cluster(w);
        unmeasured.place(&bf16).unwrap();
        // Weights stay on a GPU once a job ran there: 500 MiB of f32 weights resident leave no
        // room for the bf16 ones beside them.
        let mut w = gpu_worker("g", vec![0], MIB);
        w.models[0].gpu_precisions.push("bf16".into());
        w.models[0].gpu_footprints = ["f32", "bf16"]
            .into_iter()
            .map(|precision| pb::GpuFootprint { precision: precision.into(), weight_bytes: 500 * MIB, rank_base_bytes: MIB, rank_bytes_per_token: MIB })
            .collect();
        let resident = cluster(w);
        drop(resident.place(&spec).unwrap());
        resident.place(&spec).expect("the same weights count once");
        let Err(CoordError::Exhausted(refused)) = resident.place(&bf16) else { panic!("bf16 weights planned beside resident f32 ones past the GPU") };
        assert!(refused.contains("0.49 GiB of other weights resident"), "{refused}");
    }

    #[test]
    fn a_workers_answer_names_the_rank_and_keeps_its_code_and_retry_hint() {
        let busy = tome_server::status::busy("worker w1 already runs 4 shards");
        let e = at_rank(WorkerError::Remote(busy), 3, "127.0.0.1:7001");
        assert!(e.is_busy(), "the retry hint survives: {e:?}");
        let WorkerError::Remote(s) = &e else { panic!("{e:?}") };
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.message(), "rank 3 on worker 127.0.0.1:7001: worker w1 already runs 4 shards");
        assert!(matches!(at_rank(WorkerError::Cancelled, 0, "a:1"), WorkerError::Cancelled));
    }

    #[tokio::test]
    async fn a_failed_jobs_cause_is_the_worker_that_died_not_the_rank_that_lost_it() {
        // Rank 0 reports first that its peer, rank 1, left; rank 1's own call broke (its
        // worker died). Both are UNAVAILABLE: only the worker's mark tells the consequence.
        let lost = WorkerError::Dist(tome_dist::DistError::PeerGone { rank: 0, peer: 1, what: "receive" });
        let first = at_rank(WorkerError::Remote(tonic::Status::from(lost)), 0, "10.0.0.1:7001");
        assert!(first.is_peer_failure());
        let mut ranks = JoinSet::new();
        ranks.spawn(async { (1, Err(at_rank(remote(tonic::Status::unknown("error reading a body from connection")), 1, "10.0.0.2:7001"))) });
        let found = cause(first, &mut ranks).await;
        assert_eq!(found.code(), tonic::Code::Unavailable);
        assert!(found.to_string().starts_with("rank 1 on worker 10.0.0.2:7001: a worker failed mid-job"), "{found}");
    }
}
