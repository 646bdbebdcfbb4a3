//! Which workers are live: the set a coordinator plans over.
//!
//! Two sources of candidates behind one trait, passing one conformance suite
//! (tests/membership.rs):
//! - [`StaticMembership`]: a fixed `--workers` list.
//! - [`EtcdMembership`]: workers register under `{prefix}/workers/` with a lease
//!   (`tome_worker::EtcdRegistration`); the coordinator reads the prefix and watches it.
//!
//! Either way a candidate is live only while it answers `Worker.Info` to the coordinator's
//! probes, every `every`: a worker that died is dropped within a probe whatever etcd says, and
//! during an etcd outage the last entries known are still probed, so jobs keep running on the
//! live ones. Over TLS the probe's handshake checks the worker's certificate (the cluster CA
//! signed it, for the host it is reached at), and a registered entry counts only if the worker
//! at its address answers with the entry's name: writing to etcd alone places no one.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tome_proto::v1 as pb;
use tome_server::tls::ClientTls;
use tracing::{debug, info, warn};

/// The live workers, ordered by name; every change is published.
pub trait Membership: Send + Sync {
    fn subscribe(&self) -> watch::Receiver<Vec<pb::WorkerInfo>>;

    fn live(&self) -> Vec<pb::WorkerInfo> {
        self.subscribe().borrow().clone()
    }
}

/// Publishes `workers` (sorted by name) if they differ from what was published.
fn publish(tx: &watch::Sender<Vec<pb::WorkerInfo>>, mut workers: Vec<pb::WorkerInfo>) {
    workers.sort_by(|a, b| a.name.cmp(&b.name));
    tx.send_if_modified(|current| {
        let changed = current.iter().map(|w| (&w.name, &w.address)).ne(workers.iter().map(|w| (&w.name, &w.address)));
        // Keep the freshest figures (shards running) even when the set is the same.
        *current = workers;
        changed
    });
}

/// A worker a source names: where to reach it and, for a registered entry, the name it
/// registered under (which the worker must answer with).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Candidate {
    address: String,
    name: Option<String>,
}

/// Refused entries remembered (so as to be logged once each) at most.
const MAX_REFUSED_REMEMBERED: usize = 1024;

/// Probes the current candidates every `every` (and at once when they change) and publishes
/// those that answer as themselves.
fn spawn_prober(mut candidates: watch::Receiver<Vec<Candidate>>, every: Duration, tls: Option<ClientTls>, tx: watch::Sender<Vec<pb::WorkerInfo>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Entries refused for their identity are said once each, not every probe.
        let mut refused: HashSet<(String, String)> = HashSet::new();
        loop {
            let now: Vec<Candidate> = candidates.borrow_and_update().clone();
            let mut probes = tokio::task::JoinSet::new();
            // The configuration as it is now (certificates are reloaded when their files change).
            let tls_now = tls.as_ref().map(|t| t.borrow().clone());
            for c in now {
                let (timeout, tls) = (every.max(Duration::from_millis(500)), tls_now.clone());
                probes.spawn(async move {
                    let info = probe(c.address.clone(), timeout, tls).await;
                    (c, info)
                });
            }
            let mut live = Vec::new();
            while let Some(answer) = probes.join_next().await {
                let Ok((candidate, Some(info))) = answer else { continue };
                match &candidate.name {
                    Some(name) if *name != info.name || info.address != candidate.address => {
                        // Bounded: entries written to etcd by whoever can write there.
                        if refused.len() >= MAX_REFUSED_REMEMBERED {
                            refused.clear();
                        }
                        if refused.insert((name.clone(), candidate.address.clone())) {
                            warn!(
                                entry = %name,
                                address = %candidate.address,
                                answered_name = %info.name,
                                answered_address = %info.address,
                                "a registered worker is not who answers at its address; not planning on it"
                            );
                        }
                    }
                    _ => live.push(info),
                }
            }
            publish(&tx, live);
            tokio::select! {
                changed = candidates.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(every) => {}
            }
        }
    })
}

/// A fixed list of worker addresses, each probed every `every` (over TLS with a TLS
/// configuration).
pub struct StaticMembership {
    rx: watch::Receiver<Vec<pb::WorkerInfo>>,
    task: JoinHandle<()>,
    // Keeps the candidates' channel open for the prober.
    _candidates: watch::Sender<Vec<Candidate>>,
}

impl StaticMembership {
    pub fn start(addresses: Vec<String>, every: Duration, tls: Option<ClientTls>) -> Self {
        let (candidates, candidates_rx) = watch::channel(addresses.into_iter().map(|address| Candidate { address, name: None }).collect());
        let (tx, rx) = watch::channel(Vec::new());
        let task = spawn_prober(candidates_rx, every, tls, tx);
        StaticMembership { rx, task, _candidates: candidates }
    }
}

/// `Worker.Info` of the worker at `address`, or `None` if it does not answer in time.
async fn probe(address: String, timeout: Duration, tls: Option<tonic::transport::ClientTlsConfig>) -> Option<pb::WorkerInfo> {
    let endpoint = match tome_server::tls::endpoint(&address, tls.as_ref()) {
        Ok(e) => e.connect_timeout(timeout).timeout(timeout),
        Err(e) => {
            warn!(error = %e, "cannot probe worker {address}");
            return None;
        }
    };
    // Why a worker is not live (down, or a certificate that does not check out) is said at
    // debug level: a down worker would say it every probe.
    let channel = endpoint.connect().await.inspect_err(|e| debug!(error = ?e, "worker {address} does not answer")).ok()?;
    let mut client = pb::worker_client::WorkerClient::new(channel);
    let mut info = client.info(pb::WorkerInfoRequest {}).await.inspect_err(|s| debug!(status = ?s, "worker {address} does not answer Info")).ok()?.into_inner();
    if info.address.is_empty() {
        info.address = address;
    }
    Some(info)
}

impl Membership for StaticMembership {
    fn subscribe(&self) -> watch::Receiver<Vec<pb::WorkerInfo>> {
        self.rx.clone()
    }
}

impl Drop for StaticMembership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The workers registered in etcd under a prefix, each live while it answers its probes.
pub struct EtcdMembership {
    rx: watch::Receiver<Vec<pb::WorkerInfo>>,
    follower: JoinHandle<()>,
    prober: JoinHandle<()>,
}

impl EtcdMembership {
    /// Connects (the first connection must succeed: a wrong address is a start-up error), then
    /// follows the prefix in the background, reconnecting when etcd goes away, and probes the
    /// entries every `every` (over TLS with `tls`).
    pub async fn start(etcd: tome_server::EtcdAccess, prefix: &str, every: Duration, tls: Option<ClientTls>) -> Result<Self, etcd_client::Error> {
        let client = etcd.connect().await?;
        let prefix = format!("{}/workers/", prefix.trim_end_matches('/'));
        let (candidates, candidates_rx) = watch::channel(Vec::new());
        let follower = tokio::spawn(async move {
            let mut client = Some(client);
            loop {
                let c = match client.take() {
                    Some(c) => c,
                    None => match etcd.connect().await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(error = %e, "etcd unreachable; retrying (the last workers known stay candidates)");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                };
                if let Err(e) = follow(c, &prefix, &candidates).await {
                    warn!(error = %e, "lost the etcd watch; resyncing");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        let (tx, rx) = watch::channel(Vec::new());
        let prober = spawn_prober(candidates_rx, every, tls, tx);
        Ok(EtcdMembership { rx, follower, prober })
    }
}

/// Reads the prefix, then applies every change to it until the watch fails.
async fn follow(mut client: Client, prefix: &str, tx: &watch::Sender<Vec<Candidate>>) -> Result<(), etcd_client::Error> {
    let resp = client.get(prefix, Some(GetOptions::new().with_prefix())).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut workers: BTreeMap<Vec<u8>, pb::WorkerInfo> = BTreeMap::new();
    for kv in resp.kvs() {
        if let Some(info) = decode(kv.key(), kv.value()) {
            workers.insert(kv.key().to_vec(), info);
        }
    }
    publish_candidates(tx, &workers);
    info!(workers = workers.len(), revision, "following etcd");
    let mut stream = client.watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1))).await?;
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            return Err(etcd_client::Error::WatchError(format!("watch cancelled: {}", resp.cancel_reason())));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => {
                    if let Some(info) = decode(kv.key(), kv.value()) {
                        workers.insert(kv.key().to_vec(), info);
                    }
                }
                EventType::Delete => {
                    workers.remove(kv.key());
                }
            }
        }
        publish_candidates(tx, &workers);
    }
    Err(etcd_client::Error::WatchError("the watch stream ended".into()))
}

/// The registered entries as candidates, published if they changed.
fn publish_candidates(tx: &watch::Sender<Vec<Candidate>>, entries: &BTreeMap<Vec<u8>, pb::WorkerInfo>) {
    let candidates: Vec<Candidate> = entries.values().map(|w| Candidate { address: w.address.clone(), name: Some(w.name.clone()) }).collect();
    tx.send_if_modified(|current| {
        let changed = *current != candidates;
        if changed {
            *current = candidates;
        }
        changed
    });
}

fn decode(key: &[u8], value: &[u8]) -> Option<pb::WorkerInfo> {
    match pb::WorkerInfo::decode(value) {
        Ok(info) if !info.address.is_empty() => Some(info),
        _ => {
            warn!(key = %String::from_utf8_lossy(key), "ignoring an etcd entry that is not a worker's info");
            None
        }
    }
}

impl Membership for EtcdMembership {
    fn subscribe(&self) -> watch::Receiver<Vec<pb::WorkerInfo>> {
        self.rx.clone()
    }
}

impl Drop for EtcdMembership {
    fn drop(&mut self) {
        self.follower.abort();
        self.prober.abort();
    }
}
