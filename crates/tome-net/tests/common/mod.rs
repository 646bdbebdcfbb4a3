//! What the Group backend tests share: two peer hubs serving `tome.v1.Peer` on 127.0.0.1
//! sockets (as two worker processes would), and a launcher that runs a closure on every rank of
//! a new job, rank r joining hub r mod 2.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tome_dist::{Group, RankError};
use tome_net::{PeerGroup, PeerHub, PeerLimits};

pub const HUBS: usize = 2;

pub struct Hubs {
    pub hubs: Vec<PeerHub>,
    pub addresses: Vec<String>,
    _runtime: tokio::runtime::Runtime,
}

pub fn hubs() -> &'static Hubs {
    static HUBS_ONCE: OnceLock<Hubs> = OnceLock::new();
    HUBS_ONCE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut hubs = Vec::new();
        let mut addresses = Vec::new();
        for _ in 0..HUBS {
            let hub = PeerHub::new(runtime.handle().clone(), PeerLimits::default());
            let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
            addresses.push(listener.local_addr().unwrap().to_string());
            let service = hub.service();
            runtime.spawn(async move {
                tonic::transport::Server::builder().add_service(service).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)).await.unwrap();
            });
            hubs.push(hub);
        }
        Hubs { hubs, addresses, _runtime: runtime }
    })
}

/// Runs `f` on every rank of a new `p`-rank job, rank r hosted by hub r mod 2; `group` turns
/// the rank's peer group into the group `f` runs on.
pub fn launch_with<T: Send, E: RankError, G: Group>(
    p: usize,
    group: impl Fn(PeerGroup) -> Result<G, E> + Sync,
    f: impl Fn(&dyn Group) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E> {
    static JOBS: AtomicU64 = AtomicU64::new(0);
    let h = hubs();
    let job = format!("test-{}", JOBS.fetch_add(1, Ordering::Relaxed));
    let addresses: Vec<String> = (0..p).map(|r| h.addresses[r % HUBS].clone()).collect();
    let secret = tome_net::JobSecret::random();
    let results: Vec<Result<T, E>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..p)
            .map(|r| {
                let (f, group, job, addresses, secret) = (&f, &group, &job, &addresses, &secret);
                scope.spawn(move || -> Result<T, E> {
                    let peers = h.hubs[r % HUBS].join(job, secret, r, addresses, None)?;
                    f(&group(peers)?)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => errors.push(e),
        }
    }
    let cause = errors.iter().position(|e| !e.is_peer_gone()).unwrap_or(0);
    match errors.into_iter().nth(cause) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
