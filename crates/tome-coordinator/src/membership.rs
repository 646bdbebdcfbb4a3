//! Which workers are live: the set a coordinator plans over.
//!
//! Two backends behind one trait, passing one conformance suite (tests/membership.rs):
//! - [`StaticMembership`]: a fixed `--workers` list, probed with `Worker.Info`; a worker is live
//!   while it answers.
//! - [`EtcdMembership`]: workers register under `{prefix}/workers/` with a lease
//!   (`tome_worker::EtcdRegistration`); the coordinator reads the prefix and watches it, so a
//!   worker that leaves or whose lease expires drops out at once.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tome_proto::v1 as pb;
use tonic::transport::ClientTlsConfig;
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

/// A fixed list of worker addresses, each probed every `every` (over TLS with a TLS
/// configuration).
pub struct StaticMembership {
    rx: watch::Receiver<Vec<pb::WorkerInfo>>,
    task: JoinHandle<()>,
}

impl StaticMembership {
    pub fn start(addresses: Vec<String>, every: Duration, tls: Option<ClientTlsConfig>) -> Self {
        let (tx, rx) = watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            loop {
                let mut probes = tokio::task::JoinSet::new();
                for a in &addresses {
                    probes.spawn(probe(a.clone(), every.max(Duration::from_millis(500)), tls.clone()));
                }
                let mut live = Vec::new();
                while let Some(answer) = probes.join_next().await {
                    live.extend(answer.ok().flatten());
                }
                publish(&tx, live);
                tokio::time::sleep(every).await;
            }
        });
        StaticMembership { rx, task }
    }
}

/// `Worker.Info` of the worker at `address`, or `None` if it does not answer in time.
async fn probe(address: String, timeout: Duration, tls: Option<ClientTlsConfig>) -> Option<pb::WorkerInfo> {
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

/// The workers registered in etcd under a prefix.
pub struct EtcdMembership {
    rx: watch::Receiver<Vec<pb::WorkerInfo>>,
    task: JoinHandle<()>,
}

impl EtcdMembership {
    /// Connects (the first connection must succeed: a wrong address is a start-up error), then
    /// follows the prefix in the background, reconnecting when etcd goes away.
    pub async fn start(endpoints: Vec<String>, prefix: &str) -> Result<Self, etcd_client::Error> {
        let client = Client::connect(&endpoints, Some(tome_server::etcd_options())).await?;
        let prefix = format!("{}/workers/", prefix.trim_end_matches('/'));
        let (tx, rx) = watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            let mut client = Some(client);
            loop {
                let c = match client.take() {
                    Some(c) => c,
                    None => match Client::connect(&endpoints, Some(tome_server::etcd_options())).await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(error = %e, "etcd unreachable; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    },
                };
                if let Err(e) = follow(c, &prefix, &tx).await {
                    warn!(error = %e, "lost the etcd watch; resyncing");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        Ok(EtcdMembership { rx, task })
    }
}

/// Reads the prefix, then applies every change to it until the watch fails.
async fn follow(mut client: Client, prefix: &str, tx: &watch::Sender<Vec<pb::WorkerInfo>>) -> Result<(), etcd_client::Error> {
    let resp = client.get(prefix, Some(GetOptions::new().with_prefix())).await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut workers: BTreeMap<Vec<u8>, pb::WorkerInfo> = BTreeMap::new();
    for kv in resp.kvs() {
        if let Some(info) = decode(kv.key(), kv.value()) {
            workers.insert(kv.key().to_vec(), info);
        }
    }
    publish(tx, workers.values().cloned().collect());
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
        publish(tx, workers.values().cloned().collect());
    }
    Err(etcd_client::Error::WatchError("the watch stream ended".into()))
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
        self.task.abort();
    }
}
