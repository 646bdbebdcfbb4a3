//! The peer hub of one process: where the ranks it hosts receive their frames.
//!
//! Every rank of a job that runs here joins the hub ([`PeerHub::join`]) and gets a
//! [`PeerGroup`]; the hub serves `tome.v1.Peer`, whose `Exchange` streams — one per ordered pair
//! of ranks, opened by the sender — it routes into the receiving rank's inbox for that sender.
//! Inboxes are bounded: a rank that does not keep up stops the hub reading its stream, and
//! HTTP/2 flow control holds the sender back. A stream may arrive before its receiving rank has
//! joined (ranks start at slightly different times); it waits for the rank, up to a limit.
//!
//! Every rank joins under its job's [`JobSecret`]: a stream is routed only if its open frame
//! holds the receiving rank's secret, and a cancel stops only the ranks that joined under the
//! secret it holds. A caller that knows a job's id but not its secret reaches nothing.
//!
//! With a client TLS configuration ([`PeerHub::with_tls`]) the hub's streams to other workers
//! go over TLS, presenting this worker's certificate to peers that take calls only from
//! cluster members. Loading the configuration is the server's business (tome-server).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::time::Instant;
use tokio::sync::watch;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tome_dist::Frame;
use tome_proto::v1 as pb;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info_span, warn, Instrument};

use crate::codec::frame_from_wire;
use crate::credential::JobSecret;
use crate::peer_group::PeerGroup;
use crate::traceparent::{TraceParent, TRACEPARENT};

/// Limits of the peer layer; every one is a worker flag.
#[derive(Clone, Debug)]
pub struct PeerLimits {
    /// Frames that may wait in one (sender, receiver) inbox before the sender is held back.
    pub queue_depth: usize,
    /// Largest frame, in encoded bytes.
    pub max_frame_bytes: usize,
    /// How long a stream waits for its receiving rank to join, and a rank for a frame.
    pub rendezvous_timeout: Duration,
    pub recv_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            queue_depth: 4,
            max_frame_bytes: 256 << 20,
            rendezvous_timeout: Duration::from_secs(60),
            recv_timeout: Duration::from_secs(600),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A job's rank as the hub knows it.
type RankKey = (String, usize);

/// The receiving side of one rank: an inbox per sender, taken by that sender's stream.
pub(crate) struct Mailbox {
    inboxes: Mutex<Vec<Option<mpsc::Sender<Frame>>>>,
    pub(crate) cancel: CancellationToken,
    /// The job's secret, which the rank's streams open with and its senders must show.
    pub(crate) secret: JobSecret,
}

pub(crate) struct HubInner {
    ranks: Mutex<HashMap<RankKey, Arc<Mailbox>>>,
    joined: Notify,
    /// Jobs cancelled here lately: a rank of one that joins after its cancellation is refused
    /// (the cancel may overtake the rank's start).
    cancelled: Mutex<RecentCancels>,
    pub(crate) limits: PeerLimits,
    pub(crate) runtime: tokio::runtime::Handle,
    /// TLS for streams to other workers, as it is now (it follows its files); plaintext
    /// without it.
    tls: Option<watch::Receiver<ClientTlsConfig>>,
}

/// How often a peer connection is pinged, and how long a ping may go unanswered.
pub const PEER_KEEPALIVE: Duration = Duration::from_secs(10);

/// How long a cancelled job is remembered.
const REMEMBER_CANCELLED: Duration = Duration::from_secs(600);
/// How many cancelled jobs are remembered at most (the oldest is forgotten first): strangers'
/// Cancel calls cannot grow the worker without bound.
const MAX_REMEMBERED_CANCELS: usize = 16_384;
/// The longest job id a hub accepts (coordinators make ids of a few dozen bytes).
pub const MAX_JOB_ID_BYTES: usize = 128;

/// Recently cancelled jobs (id and secret), bounded in time and number.
#[derive(Default)]
pub(crate) struct RecentCancels {
    at: HashMap<String, Vec<(Instant, JobSecret)>>,
    order: VecDeque<(Instant, String)>,
}

impl RecentCancels {
    fn forget_old(&mut self, now: Instant) {
        while let Some((at, job)) = self.order.front() {
            if now.duration_since(*at) < REMEMBER_CANCELLED && self.order.len() <= MAX_REMEMBERED_CANCELS {
                break;
            }
            // Entries are forgotten in the order they were made: the job's oldest goes.
            if let Some(entries) = self.at.get_mut(job) {
                entries.remove(0);
                if entries.is_empty() {
                    self.at.remove(job);
                }
            }
            self.order.pop_front();
        }
    }

    fn insert(&mut self, job: &str, secret: &JobSecret, now: Instant) {
        self.at.entry(job.to_string()).or_default().push((now, secret.clone()));
        self.order.push_back((now, job.to_string()));
        self.forget_old(now);
    }

    fn contains(&self, job: &str, secret: &JobSecret) -> bool {
        self.at.get(job).is_some_and(|entries| entries.iter().any(|(_, s)| s.same(secret)))
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

/// Refuses a job id longer than [`MAX_JOB_ID_BYTES`].
pub fn check_job_id(job: &str) -> Result<(), String> {
    if job.is_empty() || job.len() > MAX_JOB_ID_BYTES {
        return Err(format!("a job id has 1 to {MAX_JOB_ID_BYTES} bytes; this one has {}", job.len()));
    }
    Ok(())
}

/// The ranks this process hosts, and the `tome.v1.Peer` service that feeds them.
#[derive(Clone)]
pub struct PeerHub {
    inner: Arc<HubInner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked while holding it; the maps stay consistent
    // (every update is a single insert or remove).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PeerHub {
    /// A hub whose streams run on `runtime`.
    pub fn new(runtime: tokio::runtime::Handle, limits: PeerLimits) -> Self {
        Self::with_tls(runtime, limits, None)
    }

    /// A hub whose streams to other workers go over TLS when `tls` is given (peer addresses
    /// stay `host:port`; the scheme becomes `https`).
    pub fn with_tls(runtime: tokio::runtime::Handle, limits: PeerLimits, tls: Option<watch::Receiver<ClientTlsConfig>>) -> Self {
        PeerHub { inner: Arc::new(HubInner { ranks: Mutex::new(HashMap::new()), joined: Notify::new(), cancelled: Mutex::new(RecentCancels::default()), limits, runtime, tls }) }
    }

    /// The `tome.v1.Peer` service to add to this process's server.
    pub fn service(&self) -> pb::peer_server::PeerServer<PeerService> {
        let limit = self.inner.limits.max_frame_bytes;
        pb::peer_server::PeerServer::new(PeerService { hub: self.inner.clone() }).max_decoding_message_size(limit).max_encoding_message_size(limit)
    }

    /// Joins rank `rank` of job `job`, run under `secret`, whose ranks run at `addresses` (one
    /// Peer address per rank). Opens a stream to every other rank at once, so that a rank that
    /// leaves — done, failed or cancelled — closes them and no peer waits on it in vain. Call
    /// from the rank's compute thread, not from the async runtime.
    pub fn join(&self, job: &str, secret: &JobSecret, rank: usize, addresses: &[String], trace: Option<TraceParent>) -> Result<PeerGroup, tome_dist::DistError> {
        let size = addresses.len();
        if rank >= size {
            return Err(tome_dist::DistError::NoSuchRank { rank, size });
        }
        check_job_id(job).map_err(tome_dist::DistError::Plan)?;
        let key = (job.to_string(), rank);
        let depth = self.inner.limits.queue_depth.max(1);
        let (mut senders, mut receivers) = (Vec::with_capacity(size), Vec::with_capacity(size));
        for src in 0..size {
            if src == rank {
                senders.push(None);
                receivers.push(None);
            } else {
                let (tx, rx) = mpsc::channel(depth);
                senders.push(Some(tx));
                receivers.push(Some(rx));
            }
        }
        let mailbox = Arc::new(Mailbox { inboxes: Mutex::new(senders), cancel: CancellationToken::new(), secret: secret.clone() });
        {
            let mut ranks = lock(&self.inner.ranks);
            // Checked under the ranks lock, which `cancel` also takes: no cancel slips between.
            if lock(&self.inner.cancelled).contains(job, secret) {
                return Err(tome_dist::DistError::Cancelled);
            }
            if ranks.contains_key(&key) {
                return Err(tome_dist::DistError::Plan(format!("rank {rank} of job {job} has already joined this worker")));
            }
            ranks.insert(key, mailbox.clone());
        }
        self.inner.joined.notify_waiters();
        PeerGroup::open(self.inner.clone(), job.to_string(), rank, addresses, receivers, mailbox, trace)
    }

    /// Stops every rank of `job` that joined here under `secret` — their waits end with
    /// `Cancelled` — and refuses ranks of it that join later under that secret. Returns how
    /// many ranks were stopped. An id no job could have (see [`check_job_id`]) stops nothing
    /// and is not remembered.
    pub fn cancel(&self, job: &str, secret: &JobSecret) -> usize {
        if check_job_id(job).is_err() {
            return 0;
        }
        let ranks = lock(&self.inner.ranks);
        lock(&self.inner.cancelled).insert(job, secret, Instant::now());
        let mut n = 0;
        for ((j, _), mailbox) in ranks.iter() {
            if j == job && mailbox.secret.same(secret) {
                mailbox.cancel.cancel();
                n += 1;
            }
        }
        n
    }

    /// Ranks joined here now (all jobs).
    pub fn ranks_joined(&self) -> usize {
        lock(&self.inner.ranks).len()
    }

    /// Cancelled jobs remembered now.
    pub fn cancels_remembered(&self) -> usize {
        lock(&self.inner.cancelled).len()
    }
}

impl HubInner {
    pub(crate) fn leave(&self, job: &str, rank: usize) {
        lock(&self.ranks).remove(&(job.to_string(), rank));
    }

    /// A connection to `address` for one ordered pair of ranks. Pairs never share a
    /// connection, so one that waits for a slow receiver cannot hold back another's frames.
    pub(crate) fn channel(&self, address: &str) -> Result<Channel, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}")).map_err(|e| format!("bad peer address {address}: {e}"))?;
        if let Some(tls) = &self.tls {
            let tls = tls.borrow().clone();
            endpoint = endpoint.tls_config(tls).map_err(|e| format!("TLS to peer {address}: {e}"))?;
        }
        let endpoint = endpoint
            .connect_timeout(self.limits.connect_timeout)
            .tcp_nodelay(true)
            .http2_adaptive_window(true)
            // A peer whose host went silent (no reset) is found by pings, not by a receive timeout.
            .http2_keep_alive_interval(PEER_KEEPALIVE)
            .keep_alive_timeout(PEER_KEEPALIVE)
            .keep_alive_while_idle(true);
        // The lazy channel spawns its connection task on the current runtime.
        let _runtime = self.runtime.enter();
        Ok(endpoint.connect_lazy())
    }

    /// Waits until rank `rank` of `job` has joined.
    async fn wait_for(&self, job: &str, rank: usize) -> Result<Arc<Mailbox>, Status> {
        let deadline = tokio::time::Instant::now() + self.limits.rendezvous_timeout;
        let key = (job.to_string(), rank);
        loop {
            let notified = self.joined.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(m) = lock(&self.ranks).get(&key) {
                return Ok(m.clone());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::not_found(format!("rank {rank} of job {job} did not join this worker within {:?}", self.limits.rendezvous_timeout)));
            }
        }
    }
}

impl Mailbox {
    /// The inbox of frames from `src`; each sender's stream takes it once.
    fn take_inbox(&self, src: usize) -> Result<mpsc::Sender<Frame>, Status> {
        let mut inboxes = lock(&self.inboxes);
        let size = inboxes.len();
        let slot = inboxes.get_mut(src).ok_or_else(|| Status::invalid_argument(format!("source rank {src} is not in a group of {size}")))?;
        slot.take().ok_or_else(|| Status::already_exists(format!("rank {src} already has a stream to this rank")))
    }
}

/// A frame over the limit is RESOURCE_EXHAUSTED, as gRPC's status codes have it (tonic reports
/// it as OUT_OF_RANGE); other failures keep their code.
fn over_limit(status: Status) -> Status {
    match status.code() {
        tonic::Code::OutOfRange => Status::resource_exhausted(status.message().to_string()),
        _ => status,
    }
}

/// `tome.v1.Peer`, routing frames into the inboxes of the ranks hosted here.
pub struct PeerService {
    hub: Arc<HubInner>,
}

/// Acks waiting for a sender that is slow to read them.
const ACK_BUFFER: usize = 16;

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    type ExchangeStream = Pin<Box<dyn Stream<Item = Result<pb::PeerAck, Status>> + Send + 'static>>;

    async fn exchange(&self, req: Request<Streaming<pb::PeerFrame>>) -> Result<Response<Self::ExchangeStream>, Status> {
        let trace = req.metadata().get(TRACEPARENT).and_then(|v| v.to_str().ok()).and_then(TraceParent::parse);
        let mut inbound = req.into_inner();
        // A stream that never opens is closed once a rank would have given up waiting for it.
        let wait = self.hub.limits.rendezvous_timeout;
        let open = tokio::time::timeout(wait, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no open frame within {wait:?}")))?
            .map_err(over_limit)?
            .ok_or_else(|| Status::invalid_argument("a peer stream must start with an open frame"))?;
        if !open.open || !open.tensors.is_empty() {
            return Err(Status::invalid_argument("a peer stream's first frame must be an open frame without tensors"));
        }
        check_job_id(&open.job_id).map_err(Status::invalid_argument)?;
        let (job, src, dst) = (open.job_id.clone(), open.src as usize, open.dst as usize);
        let mailbox = self.hub.wait_for(&job, dst).await?;
        // Before anything is taken: a stream without the job's secret leaves the rank as it was.
        if !mailbox.secret.matches(&open.secret) {
            return Err(Status::permission_denied(format!("the stream to rank {dst} of job {job} does not hold the job's credential")));
        }
        let inbox = mailbox.take_inbox(src)?;
        let (ack_tx, ack_rx) = mpsc::channel(ACK_BUFFER);
        let span = info_span!("peer_stream", job = %job, src, dst, trace_id = tracing::field::Empty);
        let trace = crate::traceparent::continue_trace(&span, trace);
        span.record("trace_id", trace.trace_id_hex());
        tokio::spawn(
            async move {
                let mut step = 0u64;
                loop {
                    let next = tokio::select! {
                        m = inbound.message() => m,
                        _ = mailbox.cancel.cancelled() => break,
                    };
                    let frame = match next {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(status) => {
                            // The sender's side went away mid-job, or sent what cannot be read;
                            // dropping the inbox tells the rank at once, and a sender still
                            // reading its acks hears why.
                            warn!(%status, "peer stream broke");
                            let _ = ack_tx.try_send(Err(over_limit(status)));
                            break;
                        }
                    };
                    if frame.job_id != job || frame.src as usize != src || frame.dst as usize != dst || frame.step != step || frame.open {
                        // The sender's job id is repeated only if it could be one.
                        let got = if frame.job_id.len() <= MAX_JOB_ID_BYTES { frame.job_id.as_str() } else { "(longer than any job id)" };
                        let msg = format!("frame out of sequence: expected job {job} {src}->{dst} step {step}, got job {got} {}->{} step {}", frame.src, frame.dst, frame.step);
                        let _ = ack_tx.send(Err(Status::invalid_argument(msg))).await;
                        break;
                    }
                    let tensors = match frame_from_wire(&frame.tensors) {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = ack_tx.send(Err(Status::invalid_argument(format!("frame {step}: {e}")))).await;
                            break;
                        }
                    };
                    let delivered = tokio::select! {
                        r = inbox.send(tensors) => r.is_ok(),
                        _ = mailbox.cancel.cancelled() => false,
                    };
                    if !delivered {
                        let _ = ack_tx.send(Err(Status::cancelled("the receiving rank has left"))).await;
                        break;
                    }
                    // The sender may have stopped reading acks; frames matter, acks do not.
                    let _ = ack_tx.try_send(Ok(pb::PeerAck { step }));
                    step += 1;
                }
                debug!(frames = step, "peer stream closed");
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(ack_rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelled_jobs_are_remembered_for_a_while_and_never_beyond_a_bound() {
        let (secret, other) = (JobSecret::random(), JobSecret::random());
        let mut recent = RecentCancels::default();
        let start = Instant::now();
        recent.insert("a", &secret, start);
        assert!(recent.contains("a", &secret));
        assert!(!recent.contains("a", &other), "a cancel under another secret refuses nothing of the job");
        for i in 0..MAX_REMEMBERED_CANCELS + 10 {
            recent.insert(&format!("job-{i}"), &secret, start);
        }
        assert_eq!(recent.len(), MAX_REMEMBERED_CANCELS, "the oldest are forgotten first");
        assert!(!recent.contains("a", &secret) && recent.contains(&format!("job-{}", MAX_REMEMBERED_CANCELS + 9), &secret));
        recent.insert("late", &secret, start + REMEMBER_CANCELLED);
        assert_eq!(recent.len(), 1, "entries older than {REMEMBER_CANCELLED:?} are forgotten");
        // A job cancelled twice stays remembered until its latest cancel is forgotten.
        let mut twice = RecentCancels::default();
        twice.insert("j", &secret, start);
        twice.insert("j", &secret, start + Duration::from_secs(300));
        twice.forget_old(start + Duration::from_secs(601));
        assert!(twice.contains("j", &secret));
        twice.forget_old(start + Duration::from_secs(901));
        assert!(!twice.contains("j", &secret) && twice.len() == 0);
    }

    #[test]
    fn job_ids_are_bounded() {
        assert!(check_job_id("job-1").is_ok());
        assert!(check_job_id("").is_err());
        let long = "x".repeat(MAX_JOB_ID_BYTES + 1);
        assert!(check_job_id(&long).unwrap_err().contains("129"));
    }
}
