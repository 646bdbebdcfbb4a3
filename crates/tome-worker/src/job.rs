//! One document through one model on P ranks of an in-process group.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tome_model::gpu::{DeviceSpec, GpuRank};

use candle_core::Tensor;
use tokio::sync::mpsc;
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::{l2_normalize, pool_spans, ModelDir, Pooling, Prepared, ShardInput};
use tracing::{info_span, Span};

use crate::error::WorkerError;
use crate::memory::RankLoad;

/// Set to stop a job at its next layer boundary.
pub type CancelFlag = Arc<AtomicBool>;

/// What to compute for one prepared document.
pub struct JobSpec {
    pub model: Arc<ModelDir>,
    pub doc: Arc<Prepared>,
    pub plan: ShardPlan,
    /// Chunk spans to pool (late chunking); empty for none.
    pub chunks: Vec<Range<usize>>,
    pub document: bool,
    pub hidden: bool,
    /// Score every token (causal models).
    pub log_probs: bool,
    pub pooling: Pooling,
    pub normalize: bool,
    /// Where the ranks compute.
    pub device: DeviceSpec,
}

impl JobSpec {
    /// What rank `rank` runs, for its memory estimate (a worker derives the same from the
    /// rank's shard request).
    pub fn rank_load(&self, rank: usize) -> RankLoad<'_> {
        RankLoad {
            tokens: self.plan.shard_len(rank),
            document: self.plan.len(),
            ranks: self.plan.ranks(),
            layers: &self.doc.layers[..self.doc.layers_run()],
            global_tokens: self.doc.global_tokens.len(),
            segment_len: self.doc.run.segment_len,
            spans: pool_targets(self.doc.len(), self.document, &self.chunks).len(),
            log_probs: self.log_probs,
        }
    }

    pub fn new(model: Arc<ModelDir>, doc: Arc<Prepared>, ranks: usize, layout: Layout) -> Result<Self, WorkerError> {
        let plan = doc.plan(layout, ranks)?;
        let pooling = model.pooling;
        Ok(JobSpec { model, doc, plan, chunks: Vec::new(), document: true, hidden: false, log_probs: false, pooling, normalize: false, device: DeviceSpec::Cpu })
    }
}

#[derive(Debug)]
pub enum JobEvent {
    /// Layer `done` (1-based count) of `total` finished on every rank that reports.
    Progress {
        done: usize,
        total: usize,
    },
    Finished(JobOutput),
}

#[derive(Debug)]
pub struct JobOutput {
    /// `[width]`
    pub document: Option<Tensor>,
    /// `[chunks, width]`
    pub chunks: Option<Tensor>,
    /// `[tokens, width]`, in document order.
    pub hidden: Option<Tensor>,
    /// Element bytes the ranks sent each other (the plans' count).
    pub bytes_exchanged: u64,
    /// Bytes the ranks put on the wire for them (framing included; equal in one process).
    pub wire_bytes_exchanged: u64,
    pub compute: Duration,
    /// `[tokens - 1]`: log p(token t+1 | tokens <= t), when asked (causal models).
    pub log_probs: Option<Tensor>,
    /// exp(-mean log-prob), with the log-probs.
    pub perplexity: Option<f64>,
}

/// What one rank returns.
pub struct RankOutput {
    /// `[spans, width]` on rank 0 when spans were asked (reduced over every rank).
    pub pooled: Option<Tensor>,
    /// `[shard, width]` when asked.
    pub hidden: Option<Tensor>,
    /// `[next ids]`: the log-prob of the token after each of the rank's rows, when asked.
    pub log_probs: Option<Tensor>,
    pub bytes_sent: u64,
}

/// One rank's share of a job: its tokens, and what to compute from its last hidden state.
pub struct RankWork<'a> {
    pub model: &'a ModelDir,
    pub plan: &'a ShardPlan,
    pub input: &'a ShardInput,
    /// Spans to pool over the whole document (document first, then chunks); empty for none.
    pub spans: &'a [Range<usize>],
    pub pooling: Pooling,
    pub hidden: bool,
    /// Score the rank's tokens: the id after each of its rows (causal models).
    pub next_ids: Option<&'a [u32]>,
    /// Where the rank computes: the CPU, or a GPU that holds its activations through every
    /// layer (only its hidden rows come back).
    pub device: DeviceSpec,
    /// The rank's place among the job's ranks in this process: the GPU it takes under
    /// `--device cuda` (the slot-th, mod their count), so that a process's ranks spread over its
    /// GPUs whichever of the job's ranks it holds.
    pub gpu_slot: usize,
}

/// Runs one rank of a job on `group`: the encoder on its shard, then its part of the pooling.
/// The same code runs a rank of the in-process group and a rank on a worker process.
pub fn run_rank(group: &dyn Group, work: &RankWork, after_layer: &mut dyn FnMut(usize) -> bool) -> Result<RankOutput, tome_model::ModelError> {
    let gpu = match work.device.gpu_for(work.gpu_slot)? {
        None => None,
        Some(index) => Some(GpuRank::lease(index)?),
    };
    let hidden = work.model.model.forward_on(gpu.as_deref(), group, work.plan, work.input, after_layer)?;
    let pooled = if work.spans.is_empty() { None } else { Some(pool_spans(group, work.plan, &hidden, work.spans, work.pooling)?) };
    let log_probs = match work.next_ids {
        Some(next) => Some(work.model.model.log_probs(&hidden, next)?),
        None => None,
    };
    Ok(RankOutput { pooled: pooled.filter(|_| group.rank() == 0), hidden: work.hidden.then_some(hidden), log_probs, bytes_sent: group.bytes_sent() })
}

/// The spans a job pools: the whole document first when asked, then the chunks.
pub fn pool_targets(tokens: usize, document: bool, chunks: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut spans = Vec::with_capacity(chunks.len() + 1);
    if document {
        spans.push(0..tokens);
    }
    spans.extend(chunks.iter().cloned());
    spans
}

/// A job's outputs, put together from its ranks' results.
pub struct Assembled {
    /// `[width]`
    pub document: Option<Tensor>,
    /// `[chunks, width]`
    pub chunks: Option<Tensor>,
    /// `[tokens, width]`, in document order.
    pub hidden: Option<Tensor>,
    /// `[tokens - 1]`, in document order.
    pub log_probs: Option<Tensor>,
    pub perplexity: Option<f64>,
}

/// What the ranks of a job returned, in rank order.
#[derive(Default)]
pub struct Gathered {
    /// Rank 0's pooled rows.
    pub pooled: Option<Tensor>,
    pub hidden: Option<Vec<Tensor>>,
    pub log_probs: Option<Vec<Tensor>>,
}

/// Puts a job's outputs together from its ranks' results: the pooled rows split into document
/// and chunks and normalised if asked, hidden states and log-probs back in document order.
pub fn assemble(plan: &ShardPlan, document: bool, chunks: usize, normalize: bool, gathered: Gathered) -> Result<Assembled, WorkerError> {
    let Gathered { pooled, hidden: hidden_shards, log_probs } = gathered;
    let hidden = match hidden_shards {
        Some(shards) => Some(plan.unshard(&shards, 0)?),
        None => None,
    };
    let (log_probs, perplexity) = match log_probs {
        Some(shards) => {
            let lp = unshard_log_probs(plan, &shards)?;
            let ppl = (!lp.is_empty()).then(|| (-lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64).exp());
            let n = lp.len();
            (Some(Tensor::from_vec(lp, n, &candle_core::Device::Cpu)?), ppl)
        }
        None => (None, None),
    };
    let (mut doc, mut chunk_rows) = (None, None);
    if let Some(p) = pooled {
        let p = if normalize { l2_normalize(&p)? } else { p };
        if document {
            doc = Some(p.get(0)?);
        }
        if chunks > 0 {
            chunk_rows = Some(p.narrow(0, usize::from(document), chunks)?);
        }
    }
    Ok(Assembled { document: doc, chunks: chunk_rows, hidden, log_probs, perplexity })
}

/// The ranks' log-probs (one per row that has a next token) in document order: `[tokens - 1]`.
fn unshard_log_probs(plan: &ShardPlan, shards: &[Tensor]) -> Result<Vec<f32>, WorkerError> {
    let n = plan.len().saturating_sub(1);
    let mut out = vec![0f32; n];
    let mut filled = 0;
    for (r, t) in shards.iter().enumerate() {
        let values = t.to_vec1::<f32>()?;
        let positions = plan.positions(r);
        if values.len() > positions.len() {
            return Err(WorkerError::Internal(format!("rank {r} scored {} tokens of its {}", values.len(), positions.len())));
        }
        for (&p, v) in positions.iter().zip(values) {
            if (p as usize) < n {
                out[p as usize] = v;
                filled += 1;
            }
        }
    }
    if filled != n {
        return Err(WorkerError::Internal(format!("the ranks scored {filled} of the {n} tokens that have a successor")));
    }
    Ok(out)
}

/// Starts the job on its own thread; events (and a final error, if any) arrive on `events`.
/// Dropping the receiver cancels the job.
pub fn spawn_job(spec: JobSpec, events: mpsc::Sender<Result<JobEvent, WorkerError>>, cancel: CancelFlag) -> Result<(), WorkerError> {
    let span = info_span!("job", tokens = spec.doc.len(), ranks = spec.plan.ranks());
    std::thread::Builder::new()
        .name("tome-job".into())
        .spawn(move || {
            let result = span.in_scope(|| run(&spec, &events, &cancel, &span));
            // The job's span closes before its end is told: the caller's span (its parent) can
            // then close as soon as the caller is done, and a shutdown exports both.
            drop(span);
            // The receiver may be gone (the caller left); there is nobody left to tell.
            let _ = events.blocking_send(result.map(JobEvent::Finished));
        })
        .map(drop)
        .map_err(|e| WorkerError::Spawn(e.to_string()))
}

fn run(spec: &JobSpec, events: &mpsc::Sender<Result<JobEvent, WorkerError>>, cancel: &CancelFlag, job_span: &Span) -> Result<JobOutput, WorkerError> {
    let started = Instant::now();
    let total = spec.doc.layers_run();
    let spans = pool_targets(spec.doc.len(), spec.document, &spec.chunks);
    let outputs = run_ranks(spec.plan.ranks(), |group: &InProcessGroup| -> Result<RankOutput, tome_model::ModelError> {
        let _rank = info_span!(parent: job_span, "shard", rank = group.rank(), tokens = spec.plan.shard_len(group.rank())).entered();
        let mut after_layer = |layer: usize| {
            if group.rank() == 0 && events.blocking_send(Ok(JobEvent::Progress { done: layer + 1, total })).is_err() {
                cancel.store(true, Ordering::Relaxed);
            }
            !cancel.load(Ordering::Relaxed)
        };
        let input = spec.doc.shard(&spec.plan, group.rank());
        let next = spec.log_probs.then(|| spec.doc.next_ids(&spec.plan, group.rank()));
        let work = RankWork {
            model: &spec.model,
            plan: &spec.plan,
            input: &input,
            spans: &spans,
            pooling: spec.pooling,
            hidden: spec.hidden,
            next_ids: next.as_deref(),
            device: spec.device,
            gpu_slot: group.rank(),
        };
        run_rank(group, &work, &mut after_layer)
    });
    let outputs: Vec<RankOutput> = match outputs {
        Err(_) if cancel.load(Ordering::Relaxed) => return Err(WorkerError::Cancelled),
        other => other?,
    };
    let bytes_exchanged = outputs.iter().map(|o| o.bytes_sent).sum();
    let gathered = Gathered {
        hidden: spec.hidden.then(|| outputs.iter().filter_map(|o| o.hidden.clone()).collect()),
        log_probs: spec.log_probs.then(|| outputs.iter().filter_map(|o| o.log_probs.clone()).collect()),
        pooled: outputs.into_iter().find_map(|o| o.pooled),
    };
    let a = assemble(&spec.plan, spec.document, spec.chunks.len(), spec.normalize, gathered)?;
    Ok(JobOutput {
        document: a.document,
        chunks: a.chunks,
        hidden: a.hidden,
        log_probs: a.log_probs,
        perplexity: a.perplexity,
        bytes_exchanged,
        wire_bytes_exchanged: bytes_exchanged,
        compute: started.elapsed(),
    })
}
