//! Command-line flags: one clap struct per command; every flag can also come from a `TOME_*`
//! environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use tome_model::gpu::DeviceSpec;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tome_attn::Precision;

#[derive(Parser)]
#[command(name = "tome", version, about = "Exact transformer processing of book-length inputs, spread over ranks")]
pub struct Cli {
    /// Log filter (tracing's EnvFilter syntax), logs go to stderr.
    #[arg(long, env = "TOME_LOG", default_value = "warn", global = true)]
    pub log: String,
    /// Log lines as text, or as one JSON object a line (for log collectors).
    #[arg(long, env = "TOME_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Export trace spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317),
    /// continuing the trace of each request's `traceparent`. Spans the --log filter keeps are
    /// exported.
    #[arg(long, env = "TOME_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// Threads that compute (shared by the ranks of this process); 0: one per CPU this process
    /// may use. Set it to the container's CPU limit where the CPU count is the node's.
    #[arg(long, env = "TOME_THREADS", default_value_t = 0, global = true)]
    pub threads: usize,
    /// Freed memory (MiB) the process keeps for reuse between the layers of a job instead of
    /// handing it back to the kernel, which would fault and zero it again; it is handed back when
    /// the process goes idle. 0 keeps the allocator's defaults.
    #[arg(long, env = "TOME_HEAP_RETAIN_MIB", default_value_t = 2047, global = true)]
    pub heap_retain_mib: usize,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Command {
    /// Serve the embedded default: a coordinator and its ranks in this process, over gRPC.
    Run(RunArgs),
    /// Serve one part of a cluster: a coordinator, or a worker.
    #[command(subcommand)]
    Serve(ServeCommand),
    /// Process one document and write its outputs.
    Process(ProcessArgs),
    /// Process a shelf of documents (a directory, a glob or a JSONL manifest), resumably.
    Batch(BatchArgs),
    /// Show what a coordinator (or the embedded default) serves.
    Info(InfoArgs),
    /// Benchmarks: tome's side of scripts/bench/ (one JSON record per case).
    Bench(BenchArgs),
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Every case, each in a fresh process; JSON records to --out (or stdout).
    Suite {
        /// Tiny sizes: the whole suite in seconds.
        #[arg(long)]
        smoke: bool,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The suite's cases, one `NAME TOKENS` line each (scripts/bench/run.sh runs them one by one,
    /// each beside its reference).
    List {
        /// The smoke suite's sizes.
        #[arg(long)]
        smoke: bool,
    },
    /// One case (dense, dense-causal, longformer, bigbird, reformer-lsh, performer, fma-peak,
    /// scaling-FAMILY, book) on --tokens tokens; prints its JSON record.
    Case {
        name: String,
        #[arg(long, default_value_t = 4096)]
        tokens: usize,
    },
}

/// The embedded deployment: models and how jobs are spread and limited.
#[derive(Args, Clone)]
pub struct EmbeddedArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json); repeat to serve several.
    #[arg(long = "model", env = "TOME_MODEL", value_delimiter = ',', default_value = "data/models/all-MiniLM-L6-v2")]
    pub models: Vec<PathBuf>,
    /// Ranks a job is spread over (outputs are identical for every value).
    #[arg(long, env = "TOME_RANKS", default_value_t = 2)]
    pub ranks: usize,
    /// Longest document accepted, in tokens.
    #[arg(long, env = "TOME_MAX_DOCUMENT_TOKENS", default_value_t = 4_000_000)]
    pub max_document_tokens: usize,
    /// Largest document accepted, in bytes of text.
    #[arg(long, env = "TOME_MAX_DOCUMENT_BYTES", default_value_t = 64 << 20)]
    pub max_document_bytes: usize,
    /// Most ranks a request may ask for.
    #[arg(long, env = "TOME_MAX_RANKS", default_value_t = 64)]
    pub max_ranks: usize,
    /// Jobs running at once; more wait in the queue (--max-queued-requests).
    #[arg(long, env = "TOME_MAX_CONCURRENT_JOBS", default_value_t = 2)]
    pub max_concurrent_jobs: usize,
    /// Jobs one caller (one API key) may run at once, so no caller takes every place; more wait
    /// in the queue while other callers' requests run. 0: no limit of its own.
    #[arg(long, env = "TOME_MAX_JOBS_PER_CALLER", default_value_t = 0)]
    pub max_jobs_per_caller: usize,
    /// Tokens of all jobs in flight together; more wait in the queue. A document with more
    /// tokens than this is refused.
    #[arg(long, env = "TOME_MAX_TOKENS_IN_FLIGHT", default_value_t = 8_000_000)]
    pub max_tokens_in_flight: usize,
    /// Requests that wait for a place beyond the free ones (callers take turns); more are
    /// refused with RESOURCE_EXHAUSTED and retry-after. Each holds its text (up to
    /// --max-document-bytes) while it waits. 0: refuse what cannot run now.
    #[arg(long, env = "TOME_MAX_QUEUED_REQUESTS", default_value_t = 32)]
    pub max_queued_requests: usize,
    /// Tokens of the tokenized requests waiting, together; more are refused with
    /// RESOURCE_EXHAUSTED and retry-after.
    #[arg(long, env = "TOME_MAX_QUEUED_TOKENS", default_value_t = 16_000_000)]
    pub max_queued_tokens: usize,
    /// Largest gRPC message received or sent, in bytes.
    #[arg(long, env = "TOME_MAX_MESSAGE_BYTES", default_value_t = 64 << 20)]
    pub max_message_bytes: usize,
    /// Where the ranks compute: cpu, cuda (every GPU, a job's k-th rank here on GPU k mod their
    /// count) or cuda:N (that GPU). A GPU holds a rank's activations through every layer;
    /// asking for one where there is none is an error.
    #[arg(long, env = "TOME_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
}

/// What every server shares: where to serve metrics, how long to drain on shutdown.
#[derive(Args, Clone)]
pub struct OpsArgs {
    /// Serve Prometheus metrics over HTTP on this address (e.g. 0.0.0.0:9090).
    #[arg(long, env = "TOME_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds in-flight work may take to finish after SIGTERM before it is cancelled.
    #[arg(long, env = "TOME_GRACE_SECONDS", default_value_t = 30)]
    pub grace_seconds: u64,
}

/// TLS on a server's listener. Beyond loopback a listener speaks TLS, or is told
/// `--insecure-plaintext`.
#[derive(Args, Clone, Default)]
pub struct ServerTlsArgs {
    /// This server's certificate chain (PEM). With --tls-key the listener speaks only TLS; the
    /// certificate names the host callers reach it at (a worker's: its --advertise host).
    #[arg(long, env = "TOME_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TOME_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Callers must present a certificate this CA signed (PEM): mutual TLS.
    #[arg(long, env = "TOME_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve plaintext on an address reachable beyond loopback, which is refused without this
    /// flag: anyone who reaches the port can call the server. Logged as a warning at start-up.
    #[arg(long, env = "TOME_INSECURE_PLAINTEXT", conflicts_with = "tls_cert")]
    pub insecure_plaintext: bool,
}

impl ServerTlsArgs {
    pub fn files(&self) -> tome_server::tls::ServerTlsFiles {
        tome_server::tls::ServerTlsFiles { cert: self.tls_cert.clone(), key: self.tls_key.clone(), client_ca: self.tls_client_ca.clone() }
    }
}

/// TLS to a coordinator: its CA, and a certificate to present where it checks callers'.
#[derive(Args, Clone, Default)]
pub struct ClientTlsArgs {
    /// The CA that signed the coordinator's certificate (PEM): connect over TLS (https).
    #[arg(long, env = "TOME_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// A certificate to present to the coordinator (PEM; mutual TLS), with --tls-key.
    #[arg(long, env = "TOME_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "TOME_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The API key to send the coordinator (`authorization: Bearer KEY`).
    #[arg(long, env = "TOME_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl ClientTlsArgs {
    pub fn bearer(&self) -> anyhow::Result<tome_server::auth::BearerToken> {
        tome_server::auth::BearerToken::new(self.api_key.as_deref()).map_err(|e| anyhow::anyhow!("--api-key: {e}"))
    }

    pub fn files(&self) -> tome_server::tls::ClientTlsFiles {
        tome_server::tls::ClientTlsFiles { ca: self.tls_ca.clone(), cert: self.tls_cert.clone(), key: self.tls_key.clone() }
    }
}

/// Who may call tome.v1.Tome (and the HTTP routes beside it).
#[derive(Args, Clone, Default)]
pub struct ApiKeyArgs {
    /// Callers of tome.v1.Tome must send one of the API keys in this file (`authorization:
    /// Bearer KEY`; one caller a line, `NAME KEY` or a bare `KEY`, keys at least 16
    /// characters; `#` comments). Metrics and logs name callers by NAME.
    #[arg(long, env = "TOME_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
}

impl ApiKeyArgs {
    /// The keys callers must send, when a key file is given.
    pub fn keys(&self) -> anyhow::Result<Option<std::sync::Arc<tome_server::auth::ApiKeys>>> {
        self.api_keys_file.as_deref().map(|f| tome_server::auth::ApiKeys::from_file(f).map(std::sync::Arc::new).map_err(|e| anyhow::anyhow!(e))).transpose()
    }
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub embedded: EmbeddedArgs,
    /// Address to serve tome.v1.Tome, health and reflection on.
    #[arg(long, env = "TOME_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub api_keys: ApiKeyArgs,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    #[command(flatten)]
    pub ops: OpsArgs,
}

#[derive(Subcommand)]
pub enum ServeCommand {
    /// The public API over worker processes, found in etcd or in a static list.
    Coordinator(CoordinatorArgs),
    /// A worker: runs the ranks the coordinators send it and talks to the other workers.
    Worker(WorkerArgs),
}

/// Where a cluster's workers are listed.
#[derive(Args, Clone)]
pub struct MembershipArgs {
    /// etcd endpoints (e.g. http://127.0.0.1:2379), comma-separated.
    #[arg(long, env = "TOME_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// The etcd key prefix workers register under.
    #[arg(long, env = "TOME_ETCD_PREFIX", default_value = "/tome")]
    pub etcd_prefix: String,
    /// The CA that signed etcd's certificate (PEM): talk to etcd over TLS.
    #[arg(long, env = "TOME_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd (PEM; for etcd's --client-cert-auth), with --etcd-key.
    #[arg(long, env = "TOME_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "TOME_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// The etcd user to authenticate as, with --etcd-password-file.
    #[arg(long, env = "TOME_ETCD_USER", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// The file whose first line is the etcd user's password (a mounted Secret).
    #[arg(long, env = "TOME_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl MembershipArgs {
    /// How to reach etcd, or `None` without `--etcd`.
    pub fn etcd_access(&self) -> anyhow::Result<Option<tome_server::EtcdAccess>> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        let settings = tome_server::EtcdSettings {
            endpoints: self.etcd.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password_file: self.etcd_password_file.clone(),
        };
        tome_server::EtcdAccess::new(&settings).map(Some).map_err(|e| anyhow::anyhow!(e))
    }
}

#[derive(Args)]
#[command(group(clap::ArgGroup::new("members").required(true).args(["workers", "etcd"])))]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub embedded: EmbeddedArgs,
    #[arg(long, env = "TOME_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub api_keys: ApiKeyArgs,
    /// A static list of worker addresses (host:port), comma-separated; without etcd.
    #[arg(long, env = "TOME_WORKERS", value_delimiter = ',', conflicts_with = "etcd")]
    pub workers: Vec<String>,
    #[command(flatten)]
    pub membership: MembershipArgs,
    /// How often the workers (a static list's, or those registered in etcd) are probed, in
    /// milliseconds: one that does not answer is not planned on.
    #[arg(long, env = "TOME_PROBE_MS", default_value_t = 1000)]
    pub probe_ms: u64,
    /// Runs of one job, the first included: a job whose workers are lost runs again on the live
    /// workers (within its deadline) up to this many times in all.
    #[arg(long, env = "TOME_JOB_ATTEMPTS", default_value_t = tome_coordinator::DEFAULT_JOB_ATTEMPTS)]
    pub job_attempts: usize,
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// The cluster CA, which signed the workers' certificates (PEM): call workers over TLS,
    /// presenting --cluster-tls-cert, or else --tls-cert (which that CA must then have signed).
    #[arg(long, env = "TOME_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The certificate this coordinator presents to workers (PEM, signed by the cluster CA),
    /// when its public certificate (--tls-cert) is not one: callers and workers then see two
    /// identities. With --cluster-tls-key.
    #[arg(long, env = "TOME_CLUSTER_TLS_CERT", requires_all = ["cluster_tls_key", "tls_ca"])]
    pub cluster_tls_cert: Option<PathBuf>,
    #[arg(long, env = "TOME_CLUSTER_TLS_KEY", requires = "cluster_tls_cert")]
    pub cluster_tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub ops: OpsArgs,
}

#[derive(Args)]
pub struct WorkerArgs {
    /// Model directories to load; repeat or comma-separate to serve several.
    #[arg(long = "model", env = "TOME_MODEL", value_delimiter = ',', default_value = "data/models/all-MiniLM-L6-v2")]
    pub models: Vec<PathBuf>,
    /// Address to serve tome.v1.Worker and tome.v1.Peer on (port 0: any free port).
    #[arg(long, env = "TOME_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    /// Address other processes reach this worker at (default: the address listened on).
    #[arg(long, env = "TOME_ADVERTISE")]
    pub advertise: Option<String>,
    /// Unique name among the cluster's workers (default: the advertised address).
    #[arg(long, env = "TOME_WORKER_NAME")]
    pub name: Option<String>,
    /// Shards run at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "TOME_MAX_SHARDS", default_value_t = 4)]
    pub max_shards: usize,
    /// Activation memory offered to the shards running at once, in bytes.
    #[arg(long, env = "TOME_MEMORY_BUDGET_BYTES", default_value_t = 8 << 30)]
    pub memory_budget_bytes: u64,
    /// Where this worker's ranks compute: cpu, cuda (every GPU, a job's k-th rank here on GPU k
    /// mod their count) or cuda:N (that GPU). Asking for a GPU where there is none stops the worker at
    /// start with the reason.
    #[arg(long, env = "TOME_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Frames waiting per pair of ranks before the sender is held back.
    #[arg(long, env = "TOME_PEER_QUEUE_DEPTH", default_value_t = 4)]
    pub peer_queue_depth: usize,
    /// Seconds a rank waits for a peer's frame before the job fails.
    #[arg(long, env = "TOME_PEER_RECV_TIMEOUT_SECONDS", default_value_t = 600)]
    pub peer_recv_timeout_seconds: u64,
    /// Seconds a peer stream waits for its open frame and for its receiving rank to join this
    /// worker before it is refused.
    #[arg(long, env = "TOME_PEER_RENDEZVOUS_TIMEOUT_SECONDS", default_value_t = 60)]
    pub peer_rendezvous_timeout_seconds: u64,
    /// Largest gRPC message (and peer frame) received or sent, in bytes.
    #[arg(long, env = "TOME_MAX_MESSAGE_BYTES", default_value_t = 256 << 20)]
    pub max_message_bytes: usize,
    #[command(flatten)]
    pub membership: MembershipArgs,
    /// Seconds the etcd lease lives without a keep-alive.
    #[arg(long, env = "TOME_ETCD_TTL_SECONDS", default_value_t = 10)]
    pub etcd_ttl_seconds: u64,
    /// A worker with --tls-cert needs --tls-client-ca, the cluster CA: Worker and Peer take calls
    /// only from cluster members, and this worker presents --tls-cert to its peers.
    #[command(flatten)]
    pub tls: ServerTlsArgs,
    /// The CA that signed the other workers' certificates (PEM; default: --tls-client-ca).
    #[arg(long, env = "TOME_TLS_CA", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    #[command(flatten)]
    pub ops: OpsArgs,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum Emit {
    Document,
    Chunks,
    HiddenStates,
    /// log p(token t+1 | tokens <= t) and the perplexity (causal language models).
    Logprobs,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum PoolingArg {
    Mean,
    Cls,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum LayoutArg {
    Contiguous,
    Zigzag,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum PositionsArg {
    /// Refuse documents longer than the model's learned positions.
    Refuse,
    /// Token p uses learned position p mod max_positions.
    Tile,
}

/// What to compute for a document, and how: shared by `process` and `batch`.
#[derive(Args, Clone)]
pub struct JobFlags {
    /// Model name on the coordinator (default: its first model).
    #[arg(long, env = "TOME_MODEL_NAME", default_value = "")]
    pub model_name: String,
    /// Outputs to compute.
    #[arg(long, value_enum, value_delimiter = ',', env = "TOME_EMIT", default_value = "document,chunks")]
    pub emit: Vec<Emit>,
    /// Attention for every layer: `dense` or `window:W` (W even: each token sees W/2 each side);
    /// default: what the model's config says.
    #[arg(long, env = "TOME_ATTENTION")]
    pub attention: Option<String>,
    /// Documents longer than the model's learned positions.
    #[arg(long, value_enum, env = "TOME_POSITIONS", default_value = "refuse")]
    pub positions: PositionsArg,
    /// Tokens per chunk embedding.
    #[arg(long, env = "TOME_CHUNK_TOKENS")]
    pub chunk_tokens: Option<u32>,
    /// Pooling (default: the model's own).
    #[arg(long, value_enum, env = "TOME_POOLING")]
    pub pooling: Option<PoolingArg>,
    /// L2-normalise embeddings (`--normalize=false` keeps them as pooled; default: the model's
    /// own, from sentence-transformers' modules.json).
    #[arg(long, env = "TOME_NORMALIZE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub normalize: Option<bool>,
    #[arg(long, value_enum, env = "TOME_LAYOUT", default_value = "contiguous")]
    pub layout: LayoutArg,
    /// Token positions with global attention (window attention), e.g. 0,500.
    #[arg(long, value_delimiter = ',', env = "TOME_GLOBAL_TOKENS")]
    pub global_tokens: Vec<u64>,
    /// Compute the outputs from the hidden states after this many layers (0: the embeddings;
    /// default: the last layer, as transformers' `hidden_states[k]`).
    #[arg(long, env = "TOME_HIDDEN_LAYER")]
    pub hidden_layer: Option<u32>,
    /// Tokens per segment for segment-recurrent models (Transformer-XL, Compressive); default:
    /// the config's `tgt_len`, else 128.
    #[arg(long, env = "TOME_SEGMENT_LEN")]
    pub segment_len: Option<u32>,
    /// Compute precision: `f32` (exact), `bf16` (weights and attention inputs in bfloat16,
    /// f32 accumulation) or `f16` (likewise in IEEE half precision, GPU ranks only); a model
    /// that does not implement it on its device refuses the job (`tome info` lists each
    /// model's precisions). Not the element type of written hidden states.
    #[arg(long, env = "TOME_DTYPE", default_value = "f32", value_parser = Precision::from_str)]
    pub dtype: Precision,
}

#[derive(Args)]
pub struct ProcessArgs {
    /// The document: a UTF-8 text file (omit with --ids).
    #[arg(required_unless_present = "ids")]
    pub file: Option<PathBuf>,
    /// Token ids instead of text: an int64 .npy file of shape [tokens].
    #[arg(long, env = "TOME_IDS", conflicts_with = "file")]
    pub ids: Option<PathBuf>,
    /// A coordinator to send the document to (host:port, e.g. 127.0.0.1:50051; over TLS with
    /// --tls-ca); without it the embedded default runs in this process.
    #[arg(long, env = "TOME_COORDINATOR")]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(flatten)]
    pub embedded: EmbeddedArgs,
    #[command(flatten)]
    pub job: JobFlags,
    /// Directory to write outputs into.
    #[arg(long, env = "TOME_OUT", default_value = "out")]
    pub out: PathBuf,
    /// No progress bar.
    #[arg(long, short, env = "TOME_QUIET")]
    pub quiet: bool,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
pub enum ProgressArg {
    /// Progress bars (overall, and one per large document).
    Bars,
    /// One JSON object per line on stderr, for logs.
    Json,
    /// Nothing but the final report.
    None,
}

#[derive(Args)]
pub struct BatchArgs {
    /// The documents: a directory of text files (recursively), a glob (e.g. 'books/*.txt'), or a
    /// JSONL manifest (.jsonl: one {"id", "path" or "text", "options"} object per line).
    pub input: String,
    /// A coordinator to send the documents to; without it the embedded default runs here.
    #[arg(long, env = "TOME_COORDINATOR")]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(flatten)]
    pub embedded: EmbeddedArgs,
    #[command(flatten)]
    pub job: JobFlags,
    /// Directory for the outputs, the journal and the tables; rerunning with the same one
    /// resumes (done documents are skipped, failed and changed ones redone).
    #[arg(long, env = "TOME_OUT")]
    pub out: PathBuf,
    /// Documents processed at once.
    #[arg(long, env = "TOME_BATCH_DOCUMENTS_IN_FLIGHT", default_value_t = 2)]
    pub documents_in_flight: usize,
    /// Tokens in flight at once (estimated from a document's bytes until the server counts
    /// them); a larger document runs alone.
    #[arg(long, env = "TOME_BATCH_TOKENS_IN_FLIGHT", default_value_t = 2_000_000)]
    pub tokens_in_flight: usize,
    /// Attempts after the first for a document the server could not take (busy, unavailable),
    /// with exponential backoff.
    #[arg(long, env = "TOME_BATCH_RETRIES", default_value_t = 3)]
    pub retries: u32,
    /// First backoff between attempts, in milliseconds (doubling each time).
    #[arg(long, env = "TOME_BATCH_BACKOFF_MS", default_value_t = 500)]
    pub backoff_ms: u64,
    /// Documents at least this many (estimated) tokens long get a progress bar of their own.
    #[arg(long, env = "TOME_BATCH_BAR_TOKENS", default_value_t = 20_000)]
    pub bar_tokens: usize,
    #[arg(long, value_enum, env = "TOME_PROGRESS", default_value = "bars")]
    pub progress: ProgressArg,
    /// Same as --progress none.
    #[arg(long, short, env = "TOME_QUIET")]
    pub quiet: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    /// A coordinator to ask; without it, the embedded default is described.
    #[arg(long, env = "TOME_COORDINATOR")]
    pub coordinator: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
    #[command(flatten)]
    pub embedded: EmbeddedArgs,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tome").chain(args.split_whitespace()))
    }

    #[test]
    fn the_flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn tls_flags_come_in_the_pairs_they_need() {
        let ok = |args: &str| assert!(parse(args).is_ok(), "tome {args}: {:?}", parse(args).err());
        let refused = |args: &str| assert!(parse(args).is_err(), "tome {args} was accepted");
        ok("serve worker --tls-cert c.pem --tls-key k.pem --tls-client-ca ca.pem");
        ok("serve worker --tls-cert c.pem --tls-key k.pem --tls-client-ca ca.pem --tls-ca peers.pem");
        ok("serve worker --listen 0.0.0.0:1 --insecure-plaintext");
        refused("serve worker --tls-cert c.pem");
        refused("serve worker --tls-key k.pem");
        refused("serve worker --tls-client-ca ca.pem");
        refused("serve worker --tls-ca ca.pem");
        refused("serve worker --insecure-plaintext --tls-cert c.pem --tls-key k.pem");
        ok("serve coordinator --workers a:1 --tls-cert c.pem --tls-key k.pem --tls-ca ca.pem");
        // Without an identity for workers it parses, and is refused at start-up (serve.rs).
        ok("serve coordinator --workers a:1 --tls-ca ca.pem --cluster-tls-cert c.pem --cluster-tls-key k.pem");
        refused("serve coordinator --workers a:1 --cluster-tls-cert c.pem --cluster-tls-key k.pem");
        refused("serve coordinator --workers a:1 --tls-ca ca.pem --cluster-tls-cert c.pem");
        ok("run --tls-cert c.pem --tls-key k.pem");
        refused("run --tls-client-ca ca.pem");
        ok("info --coordinator h:1 --tls-ca ca.pem --tls-cert c.pem --tls-key k.pem");
        ok("process doc.txt --coordinator h:1 --tls-ca ca.pem");
        refused("process doc.txt --coordinator h:1 --tls-cert c.pem --tls-key k.pem");
        refused("batch books --out shelf --tls-cert c.pem");
    }
}
