//! A worker's entry in etcd: `{prefix}/workers/{name}` holding its encoded `WorkerInfo`, bound
//! to a lease that a background task keeps alive. etcd is never needed to start or to serve:
//! the task registers as soon as etcd answers (retrying with backoff while it does not), and
//! again whenever etcd loses the lease (an outage longer than it). Leaving revokes the lease
//! (the entry goes at once); a worker that dies stops the keep-alive and the entry goes when the
//! lease expires.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use prost::Message;
use tokio::task::JoinHandle;
use tome_proto::v1 as pb;
use tome_server::EtcdAccess;
use tracing::{info, warn};

/// The first wait after etcd failed to answer; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long leaving may take before the lease is left to expire.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The key a worker registers under `prefix`.
pub fn worker_key(prefix: &str, name: &str) -> String {
    format!("{}/workers/{name}", prefix.trim_end_matches('/'))
}

/// The connection and lease the entry is bound to now, once registered.
type Registered = Arc<Mutex<Option<(Client, i64)>>>;

pub struct EtcdRegistration {
    key: String,
    registered: Registered,
    task: JoinHandle<()>,
}

impl EtcdRegistration {
    /// Starts registering `info` under `prefix` with a lease of `ttl`, kept alive every third of
    /// it, in the background: returns at once, whether etcd answers or not.
    pub fn start(etcd: EtcdAccess, prefix: &str, info: &pb::WorkerInfo, ttl: Duration) -> Self {
        let key = worker_key(prefix, &info.name);
        let registered: Registered = Arc::default();
        let task = tokio::spawn(stay_registered(etcd, key.clone(), info.encode_to_vec(), ttl, registered.clone()));
        EtcdRegistration { key, registered, task }
    }

    /// Whether the entry is in etcd now (as far as this worker knows).
    pub fn is_registered(&self) -> bool {
        self.registered.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Leaves at once: stops the keep-alive, deletes the entry and revokes the lease (within
    /// [`LEAVE_TIMEOUT`]; past it, or with etcd down, the entry goes when its lease expires).
    pub async fn leave(self) -> Result<(), etcd_client::Error> {
        self.task.abort();
        let Some((mut client, lease)) = self.registered.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        let key = self.key.clone();
        let leaving = async move {
            client.delete(key, None).await?;
            let _ = client.lease_revoke(lease).await;
            Ok(())
        };
        match tokio::time::timeout(LEAVE_TIMEOUT, leaving).await {
            Ok(r) => {
                info!(key = %self.key, "left etcd");
                r
            }
            Err(_) => {
                warn!(key = %self.key, "etcd did not answer in time; the entry goes when its lease expires");
                Ok(())
            }
        }
    }

    /// Stops the keep-alive without revoking, as a worker that dies would (tests).
    pub fn abandon(self) {
        self.task.abort();
    }
}

/// Registers, keeps the lease alive, and registers anew whenever that fails, for ever.
async fn stay_registered(etcd: EtcdAccess, key: String, value: Vec<u8>, ttl: Duration, registered: Registered) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let why = match register(&etcd, &key, &value, ttl).await {
            Ok((client, lease)) => {
                info!(%key, lease, "registered in etcd");
                backoff = MIN_BACKOFF;
                *registered.lock().unwrap_or_else(|p| p.into_inner()) = Some((client.clone(), lease));
                let why = keep_alive(client, lease, ttl).await;
                registered.lock().unwrap_or_else(|p| p.into_inner()).take();
                why
            }
            Err(e) => format!("etcd is unreachable: {e}"),
        };
        warn!(%key, why, retry_in = ?backoff, "not registered in etcd; registering again");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn register(etcd: &EtcdAccess, key: &str, value: &[u8], ttl: Duration) -> Result<(Client, i64), etcd_client::Error> {
    let mut client = etcd.connect().await?;
    let lease = client.lease_grant(ttl.as_secs().max(1) as i64, None).await?.id();
    client.put(key, value, Some(PutOptions::new().with_lease(lease))).await?;
    Ok((client, lease))
}

/// Keeps `lease` alive until that fails; returns why.
async fn keep_alive(mut client: Client, lease: i64, ttl: Duration) -> String {
    let period = (ttl / 3).max(Duration::from_millis(200));
    let result = async {
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
        loop {
            keeper.keep_alive().await?;
            // An answer slower than the lease itself is no answer.
            match tokio::time::timeout(ttl, responses.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                Ok(Ok(_)) => return Ok::<String, etcd_client::Error>("etcd lease expired".into()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok("etcd did not answer a keep-alive in time".into()),
            }
            tokio::time::sleep(period).await;
        }
    };
    match result.await {
        Ok(why) => why,
        Err(e) => format!("etcd keep-alive failed: {e}"),
    }
}
