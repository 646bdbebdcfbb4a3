//! The coordinator's settings; every limit is explicit (the CLI exposes each as a flag).

use tome_model::gpu::DeviceSpec;

/// Hard limits a request must stay within.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_document_tokens: usize,
    pub max_document_bytes: usize,
    pub max_ranks: usize,
    pub max_concurrent_jobs: usize,
    /// Jobs one caller (API key) may run at once; 0: no limit of its own.
    pub max_jobs_per_caller: usize,
    /// Tokens of all jobs in flight together.
    pub max_tokens_in_flight: usize,
    /// Requests waiting to run beyond the free job places (0: refuse what cannot run now).
    pub max_queued_requests: usize,
    /// Tokens of the tokenized requests waiting to run, together.
    pub max_queued_tokens: usize,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: usize,
}

impl Limits {
    /// The admission queue's bounds.
    pub fn queue(&self) -> crate::QueueLimits {
        crate::QueueLimits {
            max_jobs: self.max_concurrent_jobs,
            max_tokens: self.max_tokens_in_flight,
            max_jobs_per_caller: self.max_jobs_per_caller,
            max_waiting: self.max_queued_requests,
            max_waiting_tokens: self.max_queued_tokens,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_document_tokens: 4_000_000,
            max_document_bytes: 64 << 20,
            max_ranks: 64,
            max_concurrent_jobs: 2,
            max_jobs_per_caller: 0,
            max_tokens_in_flight: 8_000_000,
            max_queued_requests: 32,
            max_queued_tokens: 16_000_000,
            max_message_bytes: 64 << 20,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Ranks a job uses when the request does not say.
    pub default_ranks: usize,
    /// Tokens per chunk when the request asks for chunks without saying how.
    pub default_chunk_tokens: usize,
    /// Hidden-state rows per streamed message.
    pub hidden_rows_per_message: usize,
    pub limits: Limits,
    /// Where embedded ranks compute (a cluster's workers say where theirs do).
    pub device: DeviceSpec,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig { default_ranks: 2, default_chunk_tokens: 256, hidden_rows_per_message: 1024, limits: Limits::default(), device: DeviceSpec::Cpu }
    }
}
