//! A worker's entry in etcd: `{prefix}/workers/{name}` holding its encoded `WorkerInfo`, bound
//! to a lease that a background task keeps alive. Leaving revokes the lease (the entry goes at
//! once); a worker that dies stops the keep-alive and the entry goes when the lease expires.

use std::time::Duration;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use etcd_client::{Client, PutOptions};
use prost::Message;
use tokio::task::JoinHandle;
use tome_proto::v1 as pb;
use tome_server::etcd_options;
use tracing::{info, warn};

/// The key a worker registers under `prefix`.
pub fn worker_key(prefix: &str, name: &str) -> String {
    format!("{}/workers/{name}", prefix.trim_end_matches('/'))
}

pub struct EtcdRegistration {
    client: Client,
    /// The lease the entry is bound to now (the keep-alive may have had to take a new one).
    lease: Arc<AtomicI64>,
    key: String,
    keep_alive: JoinHandle<()>,
}

impl EtcdRegistration {
    /// Registers `info` under `prefix` with a lease of `ttl`, kept alive every third of it.
    pub async fn register(endpoints: &[String], prefix: &str, info: &pb::WorkerInfo, ttl: Duration) -> Result<Self, etcd_client::Error> {
        let mut client = Client::connect(endpoints, Some(etcd_options())).await?;
        let ttl_s = ttl.as_secs().max(1) as i64;
        let id = client.lease_grant(ttl_s, None).await?.id();
        let key = worker_key(prefix, &info.name);
        client.put(key.clone(), info.encode_to_vec(), Some(PutOptions::new().with_lease(id))).await?;
        info!(%key, lease = id, ttl_s, "registered in etcd");
        let lease = Arc::new(AtomicI64::new(id));
        let keep_alive = tokio::spawn(keep_alive(client.clone(), lease.clone(), key.clone(), info.encode_to_vec(), ttl));
        Ok(EtcdRegistration { client, lease, key, keep_alive })
    }

    /// Leaves at once: stops the keep-alive, deletes the entry and revokes the lease.
    pub async fn leave(mut self) -> Result<(), etcd_client::Error> {
        self.keep_alive.abort();
        // The keep-alive may have registered anew under another lease: delete the key itself.
        self.client.delete(self.key.clone(), None).await?;
        let _ = self.client.lease_revoke(self.lease.load(Ordering::Relaxed)).await;
        info!(key = %self.key, "left etcd");
        Ok(())
    }

    /// Stops the keep-alive without revoking, as a worker that dies would (tests).
    pub fn abandon(self) {
        self.keep_alive.abort();
    }
}

/// Keeps the lease alive; when etcd lost it (expired during a partition), registers anew.
async fn keep_alive(mut client: Client, lease: Arc<AtomicI64>, key: String, value: Vec<u8>, ttl: Duration) {
    let period = (ttl / 3).max(Duration::from_millis(200));
    loop {
        let id = lease.load(Ordering::Relaxed);
        let result = async {
            let (mut keeper, mut responses) = client.lease_keep_alive(id).await?;
            loop {
                keeper.keep_alive().await?;
                // An answer slower than the lease itself is no answer.
                match tokio::time::timeout(ttl, responses.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    Ok(Ok(_)) => return Ok::<&str, etcd_client::Error>("etcd lease expired"),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Ok("etcd did not answer a keep-alive in time"),
                }
                tokio::time::sleep(period).await;
            }
        }
        .await;
        match result {
            Ok(why) => warn!(%key, why, "registering again"),
            Err(e) => warn!(%key, error = %e, "etcd keep-alive failed; retrying"),
        }
        tokio::time::sleep(period).await;
        let again = async {
            let id = client.lease_grant(ttl.as_secs().max(1) as i64, None).await?.id();
            client.put(key.clone(), value.clone(), Some(PutOptions::new().with_lease(id))).await?;
            Ok::<i64, etcd_client::Error>(id)
        };
        match again.await {
            Ok(id) => lease.store(id, Ordering::Relaxed),
            Err(e) => warn!(%key, error = %e, "etcd registration failed; retrying"),
        }
    }
}
