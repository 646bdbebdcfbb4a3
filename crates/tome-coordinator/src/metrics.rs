//! The coordinator's Prometheus metrics: named statics, described once ([`describe`]); the
//! exporter itself is installed by the binary.

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};

use tome_server::auth::Caller;

use crate::error::CoordError;

/// Labelled `outcome` = ok | failed | cancelled | deadline_exceeded ([`JobOutcome`]) and
/// `caller` (the API key's caller name; `anonymous` without keys).
pub const JOBS_TOTAL: &str = "tome_jobs_total";
pub const JOBS_IN_FLIGHT: &str = "tome_jobs_in_flight";
/// Requests that arrived and do not run yet: being tokenized, or waiting for a place.
pub const QUEUE_DEPTH: &str = "tome_queue_depth";
/// Tokens of the tokenized requests waiting for a place.
pub const QUEUE_TOKENS: &str = "tome_queue_tokens";
/// From a request's arrival to its job's start.
pub const QUEUE_WAIT_SECONDS: &str = "tome_queue_wait_seconds";
/// Requests refused before their job started, labelled `reason` ([`RefusalReason`]).
pub const REQUESTS_REFUSED: &str = "tome_requests_refused_total";
/// Labelled `caller`.
pub const TOKENS_TOTAL: &str = "tome_tokens_total";
/// Labelled `stage` ([`STAGES`]: tokenize | compute | total).
pub const STAGE_SECONDS: &str = "tome_stage_seconds";
/// The worker counts under the same name.
pub const HEAP_RELEASES: &str = "tome_heap_releases_total";
/// Jobs run again because workers were lost under them.
pub const JOB_RERUNS: &str = "tome_job_reruns_total";

pub fn describe() {
    describe_counter!(JOBS_TOTAL, "Jobs that ended, by outcome.");
    describe_gauge!(JOBS_IN_FLIGHT, "Jobs running now.");
    describe_gauge!(QUEUE_DEPTH, "Requests that arrived and do not run yet: being tokenized, or waiting for a place.");
    describe_gauge!(QUEUE_TOKENS, Unit::Count, "Tokens of the requests waiting for a place.");
    describe_histogram!(QUEUE_WAIT_SECONDS, Unit::Seconds, "Time from a request's arrival to its job's start.");
    describe_counter!(REQUESTS_REFUSED, "Requests refused before their job started, by reason.");
    describe_counter!(TOKENS_TOTAL, Unit::Count, "Tokens of the jobs that completed.");
    describe_histogram!(STAGE_SECONDS, Unit::Seconds, "Time a job spent in each stage.");
    describe_counter!(JOB_RERUNS, "Times a job ran again on the live workers because workers were lost under it.");
    describe_counter!(HEAP_RELEASES, "Times the heap's freed pages went back to the kernel (the last job in flight had ended).");
}

/// The `stage` labels of [`STAGE_SECONDS`].
pub const STAGES: [&str; 3] = ["tokenize", "compute", "total"];

/// Every series this coordinator exports, at zero: present from start, before the first
/// request. `callers`: the callers its API keys name (`anonymous` without keys).
pub fn start_at_zero(callers: &[&str]) {
    for caller in callers {
        for outcome in JobOutcome::ALL {
            counter!(JOBS_TOTAL, "outcome" => outcome.label(), "caller" => caller.to_string()).increment(0);
        }
        counter!(TOKENS_TOTAL, "caller" => caller.to_string()).increment(0);
    }
    for reason in RefusalReason::ALL {
        counter!(REQUESTS_REFUSED, "reason" => reason.label()).increment(0);
    }
    gauge!(JOBS_IN_FLIGHT).set(0.0);
    queue_now(0, 0);
    for stage in STAGES {
        let _ = histogram!(STAGE_SECONDS, "stage" => stage);
    }
    let _ = histogram!(QUEUE_WAIT_SECONDS);
    counter!(JOB_RERUNS).increment(0);
    counter!(HEAP_RELEASES).increment(0);
}

/// Hands the heap's freed pages back to the kernel (`tome_server::heap`) and counts it.
pub(crate) fn release_heap() {
    tome_server::heap::release_freed_memory();
    counter!(HEAP_RELEASES).increment(1);
}

pub(crate) fn job_rerun() {
    counter!(JOB_RERUNS).increment(1);
}

/// Counts a job in flight while it lives.
pub(crate) struct JobInFlight;

impl JobInFlight {
    pub(crate) fn start() -> Self {
        gauge!(JOBS_IN_FLIGHT).increment(1.0);
        JobInFlight
    }
}

impl Drop for JobInFlight {
    fn drop(&mut self) {
        gauge!(JOBS_IN_FLIGHT).decrement(1.0);
    }
}

/// The queue as it stands: requests that do not run yet, and the tokens waiting.
pub(crate) fn queue_now(requests: usize, tokens: usize) {
    gauge!(QUEUE_DEPTH).set(requests as f64);
    gauge!(QUEUE_TOKENS).set(tokens as f64);
}

pub(crate) fn queue_wait(d: Duration) {
    histogram!(QUEUE_WAIT_SECONDS).record(d.as_secs_f64());
}

/// Why a request was refused before its job started: the `reason` label of [`REQUESTS_REFUSED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// No API key, or one this server does not accept.
    Unauthenticated,
    /// The request is malformed or asks for something the model cannot do.
    Invalid,
    UnknownModel,
    /// Over a limit for good (document, upload or ranks larger than this server takes).
    TooLarge,
    /// Refused for now (`retry-after`): the queue is full, or the workers have no room.
    Busy,
    /// No worker can take it, or the server is shutting down.
    Unavailable,
    /// Its deadline passed while it waited.
    DeadlineExceeded,
    /// The caller left while it waited.
    Cancelled,
    Internal,
}

impl RefusalReason {
    pub const ALL: [RefusalReason; 9] = [
        RefusalReason::Unauthenticated,
        RefusalReason::Invalid,
        RefusalReason::UnknownModel,
        RefusalReason::TooLarge,
        RefusalReason::Busy,
        RefusalReason::Unavailable,
        RefusalReason::DeadlineExceeded,
        RefusalReason::Cancelled,
        RefusalReason::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::Unauthenticated => "unauthenticated",
            RefusalReason::Invalid => "invalid",
            RefusalReason::UnknownModel => "unknown_model",
            RefusalReason::TooLarge => "too_large",
            RefusalReason::Busy => "busy",
            RefusalReason::Unavailable => "unavailable",
            RefusalReason::DeadlineExceeded => "deadline_exceeded",
            RefusalReason::Cancelled => "cancelled",
            RefusalReason::Internal => "internal",
        }
    }

    pub fn of(e: &CoordError) -> Self {
        match e {
            CoordError::Invalid(_) => RefusalReason::Invalid,
            CoordError::UnknownModel(_) => RefusalReason::UnknownModel,
            CoordError::Exhausted(_) => RefusalReason::TooLarge,
            CoordError::Busy(_) => RefusalReason::Busy,
            CoordError::Unavailable(_) => RefusalReason::Unavailable,
            CoordError::DeadlineExceeded => RefusalReason::DeadlineExceeded,
            CoordError::Cancelled | CoordError::CancelledOnWorker(_) => RefusalReason::Cancelled,
            CoordError::Internal(_) => RefusalReason::Internal,
        }
    }
}

/// Counts a request refused before its job started.
pub(crate) fn refused(e: &CoordError) {
    refused_for(RefusalReason::of(e));
}

pub fn refused_for(reason: RefusalReason) {
    counter!(REQUESTS_REFUSED, "reason" => reason.label()).increment(1);
}

/// How a job ended: the `outcome` label of [`JOBS_TOTAL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Ok,
    /// It failed (the error is the caller's, a worker's or the server's).
    Failed,
    /// The caller left, the server shut down, or a worker stopped a rank (an operator's cancel).
    Cancelled,
    DeadlineExceeded,
}

impl JobOutcome {
    pub const ALL: [JobOutcome; 4] = [JobOutcome::Ok, JobOutcome::Failed, JobOutcome::Cancelled, JobOutcome::DeadlineExceeded];

    pub fn label(self) -> &'static str {
        match self {
            JobOutcome::Ok => "ok",
            JobOutcome::Failed => "failed",
            JobOutcome::Cancelled => "cancelled",
            JobOutcome::DeadlineExceeded => "deadline_exceeded",
        }
    }

    /// The outcome of a job that ended with `e`, decided by its kind.
    pub fn of(e: &CoordError) -> Self {
        match e {
            CoordError::Cancelled | CoordError::CancelledOnWorker(_) => JobOutcome::Cancelled,
            CoordError::DeadlineExceeded => JobOutcome::DeadlineExceeded,
            _ => JobOutcome::Failed,
        }
    }
}

pub(crate) fn job_ended(outcome: JobOutcome, caller: &Caller) {
    counter!(JOBS_TOTAL, "outcome" => outcome.label(), "caller" => caller.name().to_string()).increment(1);
}

pub(crate) fn tokens_processed(n: usize, caller: &Caller) {
    counter!(TOKENS_TOTAL, "caller" => caller.name().to_string()).increment(n as u64);
}

pub(crate) fn stage_seconds(stage: &'static str, d: Duration) {
    histogram!(STAGE_SECONDS, "stage" => stage).record(d.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_outcome_follows_its_error_kind() {
        let labels: Vec<&str> = JobOutcome::ALL.iter().map(|o| o.label()).collect();
        assert_eq!(labels, ["ok", "failed", "cancelled", "deadline_exceeded"], "the labels JOBS_TOTAL documents");
        assert_eq!(JobOutcome::of(&CoordError::DeadlineExceeded), JobOutcome::DeadlineExceeded);
        assert_eq!(JobOutcome::of(&CoordError::Cancelled), JobOutcome::Cancelled);
        assert_eq!(JobOutcome::of(&CoordError::CancelledOnWorker("rank 1 on worker w2: the job was cancelled".into())), JobOutcome::Cancelled);
        // A worker's deadline reaches the coordinator as the job's error, not only as its own timer.
        let from_a_worker = CoordError::from(tome_worker::WorkerError::Remote(tonic::Status::deadline_exceeded("rank 0 on worker w1: the job ran past its deadline")));
        assert_eq!(JobOutcome::of(&from_a_worker), JobOutcome::DeadlineExceeded);
        for failed in [CoordError::Unavailable("a worker failed mid-job".into()), CoordError::Internal("x".into()), CoordError::Invalid("x".into())] {
            assert_eq!(JobOutcome::of(&failed), JobOutcome::Failed);
        }
    }
}
