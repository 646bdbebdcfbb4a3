//! One document through one model on P ranks of an in-process group.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tokio::sync::mpsc;
use tome_dist::{run_ranks, Group, InProcessGroup, Layout, ShardPlan};
use tome_model::{l2_normalize, pool_spans, ModelDir, Pooling, Prepared};
use tracing::{info_span, Span};

use crate::error::WorkerError;

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
    pub pooling: Pooling,
    pub normalize: bool,
}

impl JobSpec {
    pub fn new(model: Arc<ModelDir>, doc: Arc<Prepared>, ranks: usize, layout: Layout) -> Result<Self, WorkerError> {
        let plan = ShardPlan::new(layout, doc.len(), ranks)?;
        let pooling = model.pooling;
        Ok(JobSpec { model, doc, plan, chunks: Vec::new(), document: true, hidden: false, pooling, normalize: false })
    }
}

#[derive(Debug)]
pub enum JobEvent {
    /// Layer `done` (1-based count) of `total` finished on every rank that reports.
    Progress { done: usize, total: usize },
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
    pub bytes_exchanged: u64,
    pub compute: Duration,
}

struct RankOutput {
    pooled: Option<Tensor>,
    hidden: Option<Tensor>,
    bytes: u64,
}

/// Starts the job on its own thread; events (and a final error, if any) arrive on `events`.
/// Dropping the receiver cancels the job.
pub fn spawn_job(spec: JobSpec, events: mpsc::Sender<Result<JobEvent, WorkerError>>, cancel: CancelFlag) -> Result<(), WorkerError> {
    let span = info_span!("job", tokens = spec.doc.len(), ranks = spec.plan.ranks());
    std::thread::Builder::new()
        .name("tome-job".into())
        .spawn(move || {
            let _enter = span.enter();
            let result = run(&spec, &events, &cancel, &span);
            // The receiver may be gone (the caller left); there is nobody left to tell.
            let _ = events.blocking_send(result.map(JobEvent::Finished));
        })
        .map(drop)
        .map_err(|e| WorkerError::Spawn(e.to_string()))
}

fn run(spec: &JobSpec, events: &mpsc::Sender<Result<JobEvent, WorkerError>>, cancel: &CancelFlag, job_span: &Span) -> Result<JobOutput, WorkerError> {
    let started = Instant::now();
    let total = spec.doc.layers.len();
    let mut spans: Vec<Range<usize>> = Vec::with_capacity(spec.chunks.len() + 1);
    if spec.document {
        spans.push(0..spec.doc.len());
    }
    spans.extend(spec.chunks.iter().cloned());

    let outputs = run_ranks(spec.plan.ranks(), |group: &InProcessGroup| -> Result<RankOutput, tome_model::ModelError> {
        let _rank = info_span!(parent: job_span, "shard", rank = group.rank(), tokens = spec.plan.shard_len(group.rank())).entered();
        let mut after_layer = |layer: usize| {
            if group.rank() == 0 && events.blocking_send(Ok(JobEvent::Progress { done: layer + 1, total })).is_err() {
                cancel.store(true, Ordering::Relaxed);
            }
            !cancel.load(Ordering::Relaxed)
        };
        let hidden = spec.model.model.forward_shard(group, &spec.plan, &spec.doc, &mut after_layer)?;
        let pooled = if spans.is_empty() { None } else { Some(pool_spans(group, &spec.plan, &hidden, &spans, spec.pooling)?) };
        Ok(RankOutput { pooled: pooled.filter(|_| group.rank() == 0), hidden: spec.hidden.then_some(hidden), bytes: group.bytes_sent() })
    });
    let outputs: Vec<RankOutput> = match outputs {
        Err(_) if cancel.load(Ordering::Relaxed) => return Err(WorkerError::Cancelled),
        other => other?,
    };
    let bytes_exchanged = outputs.iter().map(|o| o.bytes).sum();
    let hidden = if spec.hidden {
        let shards: Vec<Tensor> = outputs.iter().filter_map(|o| o.hidden.clone()).collect();
        Some(spec.plan.unshard(&shards, 0)?)
    } else {
        None
    };
    let pooled = outputs.into_iter().find_map(|o| o.pooled);
    let (mut document, mut chunks) = (None, None);
    if let Some(p) = pooled {
        let p = if spec.normalize { l2_normalize(&p)? } else { p };
        let skip = usize::from(spec.document);
        if spec.document {
            document = Some(p.get(0)?);
        }
        if !spec.chunks.is_empty() {
            chunks = Some(p.narrow(0, skip, spec.chunks.len())?);
        }
    }
    Ok(JobOutput { document, chunks, hidden, bytes_exchanged, compute: started.elapsed() })
}

