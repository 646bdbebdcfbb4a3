//! The Group trait over gRPC peer streams: one rank of a job whose ranks live in several
//! processes.
//!
//! Rank r holds one outgoing `Exchange` stream per other rank (opened when it joins) and one
//! inbox per other rank (fed by that rank's stream into this process's hub). `send` encodes the
//! frame on the calling compute thread and queues it on the stream; `recv` waits on the inbox.
//! Frames of a pair carry consecutive steps, checked on arrival, so order is the tag exactly as
//! in the in-process backend and every operator runs unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tome_dist::{frame_bytes, DistError, Frame, Group};
use tome_proto::v1 as pb;
use tonic::metadata::MetadataValue;
use tracing::warn;

use crate::codec::frame_to_wire;
use crate::hub::{HubInner, Mailbox};
use crate::traceparent::{TraceParent, TRACEPARENT};

/// Bytes gRPC adds to every message: a compressed flag and a 4-byte length.
const GRPC_PREFIX_BYTES: u64 = 5;

/// Encoded frames queued on one outgoing stream before `send` waits.
const OUTGOING_DEPTH: usize = 2;

struct Link {
    tx: mpsc::Sender<pb::PeerFrame>,
    step: AtomicU64,
    /// Why the stream ended early, if it did.
    failure: Arc<OnceLock<String>>,
    /// Cancelled when the peer's hub said the peer rank never joined: no frame will come from it
    /// either, so a wait for one ends then rather than at the receive timeout.
    never_joined: CancellationToken,
}

/// One rank of a job whose ranks talk over `tome.v1.Peer` streams.
pub struct PeerGroup {
    hub: Arc<HubInner>,
    job: String,
    rank: usize,
    links: Vec<Option<Link>>,
    inboxes: Vec<Option<Mutex<mpsc::Receiver<Frame>>>>,
    mailbox: Arc<Mailbox>,
    bytes: AtomicU64,
    wire_bytes: AtomicU64,
}

impl PeerGroup {
    pub(crate) fn open(
        hub: Arc<HubInner>,
        job: String,
        rank: usize,
        addresses: &[String],
        receivers: Vec<Option<mpsc::Receiver<Frame>>>,
        mailbox: Arc<Mailbox>,
        trace: Option<TraceParent>,
    ) -> Result<Self, DistError> {
        let mut group = PeerGroup {
            hub,
            job,
            rank,
            links: Vec::with_capacity(addresses.len()),
            inboxes: receivers.into_iter().map(|r| r.map(Mutex::new)).collect(),
            mailbox,
            bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
        };
        for (dst, address) in addresses.iter().enumerate() {
            let link = if dst == rank { None } else { Some(group.connect(dst, address, trace)?) };
            group.links.push(link);
        }
        Ok(group)
    }

    fn connect(&self, dst: usize, address: &str, trace: Option<TraceParent>) -> Result<Link, DistError> {
        let transport = |msg: String| DistError::Transport { rank: self.rank, peer: dst, msg };
        let channel = self.hub.channel(address).map_err(transport)?;
        let (tx, rx) = mpsc::channel(OUTGOING_DEPTH);
        let open =
            pb::PeerFrame { job_id: self.job.clone(), src: self.rank as u32, dst: dst as u32, step: 0, tensors: Vec::new(), open: true, secret: self.mailbox.secret.to_wire() };
        tx.try_send(open).map_err(|e| transport(format!("could not queue the open frame: {e}")))?;
        let failure = Arc::new(OnceLock::new());
        let limit = self.hub.limits.max_frame_bytes;
        let never_joined = CancellationToken::new();
        let (job, rank, cancel, fail, absent) = (self.job.clone(), self.rank, self.mailbox.cancel.clone(), failure.clone(), never_joined.clone());
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(value) = trace.and_then(|t| MetadataValue::try_from(t.child().to_string()).ok()) {
            request.metadata_mut().insert(TRACEPARENT, value);
        }
        self.hub.runtime.spawn(async move {
            let mut client = pb::peer_client::PeerClient::new(channel).max_encoding_message_size(limit).max_decoding_message_size(limit);
            let outcome = async {
                let mut acks = client.exchange(request).await?.into_inner();
                while acks.message().await?.is_some() {}
                Ok::<(), tonic::Status>(())
            };
            let result = tokio::select! {
                r = outcome => r,
                _ = cancel.cancelled() => Ok(()),
            };
            if let Err(status) = result {
                warn!(job = %job, rank, peer = dst, %status, "peer stream failed");
                let _ = fail.set(format!("{}: {}", status.code(), status.message()));
                if status.code() == tonic::Code::NotFound {
                    absent.cancel();
                }
            }
        });
        Ok(Link { tx, step: AtomicU64::new(0), failure, never_joined })
    }

    /// Bytes this rank has put on the wire for its frames: encoded messages with their gRPC
    /// prefix (HTTP/2 adds 9 bytes per 16 KiB data frame beyond this).
    pub fn wire_bytes_sent(&self) -> u64 {
        self.wire_bytes.load(Ordering::Relaxed)
    }

    fn check(&self, peer: usize) -> Result<(), DistError> {
        if peer >= self.links.len() || peer == self.rank {
            return Err(DistError::NoSuchRank { rank: peer, size: self.links.len() });
        }
        Ok(())
    }

    /// Runs `fut` to completion from the compute thread, ending early when the job is cancelled.
    fn wait<T>(&self, fut: impl std::future::Future<Output = T>) -> Result<T, DistError> {
        let cancel = &self.mailbox.cancel;
        self.hub.runtime.block_on(async {
            tokio::select! {
                v = fut => Ok(v),
                _ = cancel.cancelled() => Err(DistError::Cancelled),
            }
        })
    }
}

impl Group for PeerGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.links.len()
    }

    fn send(&self, dst: usize, frame: Frame) -> Result<(), DistError> {
        self.check(dst)?;
        let link = self.links[dst].as_ref().ok_or(DistError::NoSuchRank { rank: dst, size: self.links.len() })?;
        let gone = |why: Option<&String>| match why {
            Some(msg) => DistError::Transport { rank: self.rank, peer: dst, msg: msg.clone() },
            None => DistError::PeerGone { rank: self.rank, peer: dst, what: "send" },
        };
        if let Some(why) = link.failure.get() {
            return Err(gone(Some(why)));
        }
        let bytes = frame_bytes(&frame);
        let tensors = frame_to_wire(&frame).map_err(|e| DistError::Plan(format!("frame for rank {dst} cannot be encoded: {e}")))?;
        let step = link.step.fetch_add(1, Ordering::Relaxed);
        let message = pb::PeerFrame { job_id: self.job.clone(), src: self.rank as u32, dst: dst as u32, step, tensors, open: false, secret: Vec::new() };
        let encoded = message.encoded_len() as u64;
        if encoded > self.hub.limits.max_frame_bytes as u64 {
            return Err(DistError::Plan(format!("a frame of {encoded} bytes exceeds the peer frame limit of {} bytes", self.hub.limits.max_frame_bytes)));
        }
        self.wait(link.tx.send(message))?.map_err(|_| gone(link.failure.get()))?;
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.wire_bytes.fetch_add(encoded + GRPC_PREFIX_BYTES, Ordering::Relaxed);
        Ok(())
    }

    fn recv(&self, src: usize) -> Result<Frame, DistError> {
        self.check(src)?;
        let inbox = self.inboxes[src].as_ref().ok_or(DistError::NoSuchRank { rank: src, size: self.links.len() })?;
        let mut inbox = inbox.lock().unwrap_or_else(|p| p.into_inner());
        let timeout = self.hub.limits.recv_timeout;
        let never_joined = self.links[src].as_ref().map(|l| l.never_joined.clone()).unwrap_or_default();
        // Built inside the future: a timer needs the runtime's context when it is created.
        let next = async {
            tokio::select! {
                // A frame already here is taken before anything else is looked at.
                biased;
                frame = tokio::time::timeout(timeout, inbox.recv()) => Some(frame),
                _ = never_joined.cancelled() => None,
            }
        };
        match self.wait(next)? {
            Some(Ok(Some(frame))) => Ok(frame),
            Some(Ok(None)) => Err(DistError::PeerGone { rank: self.rank, peer: src, what: "receive" }),
            Some(Err(_)) => Err(DistError::Transport { rank: self.rank, peer: src, msg: format!("no frame within {timeout:?}") }),
            None => Err(DistError::Transport { rank: self.rank, peer: src, msg: format!("rank {src} never joined the job") }),
        }
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for PeerGroup {
    fn drop(&mut self) {
        // Closing the outgoing streams (dropping their senders) tells every peer this rank is gone.
        self.links.clear();
        self.hub.leave(&self.job, self.rank);
    }
}
