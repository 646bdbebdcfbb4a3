//! The operator suite (crates/tome-dist/tests/suite) on the gRPC peer backend: every rank a
//! thread of this test, its frames crossing real `tome.v1.Peer` streams over sockets on
//! 127.0.0.1 between two hubs (as two worker processes would), so pairs of ranks talk both
//! within one hub and across hubs.

#[path = "../../tome-dist/tests/suite/operators.rs"]
mod suite;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tome_dist::{Group, RankError};
use tome_net::{PeerHub, PeerLimits};

const HUBS: usize = 2;

struct Hubs {
    hubs: Vec<PeerHub>,
    addresses: Vec<String>,
    _runtime: tokio::runtime::Runtime,
}

fn hubs() -> &'static Hubs {
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
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                    .await
                    .unwrap();
            });
            hubs.push(hub);
        }
        Hubs { hubs, addresses, _runtime: runtime }
    })
}

/// Runs `f` on every rank of a new `p`-rank job, rank r hosted by hub r mod 2.
pub fn launch<T: Send, E: RankError>(p: usize, f: impl Fn(&dyn Group) -> Result<T, E> + Sync) -> Result<Vec<T>, E> {
    static JOBS: AtomicU64 = AtomicU64::new(0);
    let h = hubs();
    let job = format!("test-{}", JOBS.fetch_add(1, Ordering::Relaxed));
    let addresses: Vec<String> = (0..p).map(|r| h.addresses[r % HUBS].clone()).collect();
    let results: Vec<Result<T, E>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..p)
            .map(|r| {
                let (f, job, addresses) = (&f, &job, &addresses);
                scope.spawn(move || -> Result<T, E> {
                    let group = h.hubs[r % HUBS].join(job, r, addresses, None)?;
                    f(&group)
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

#[test]
fn frames_on_the_wire_cost_little_beyond_their_elements() {
    use candle_core::{Device, Tensor};
    let h = hubs();
    let addresses = vec![h.addresses[0].clone(), h.addresses[1].clone()];
    let (element, wire) = std::thread::scope(|scope| {
        let a = scope.spawn(|| {
            let g = h.hubs[0].join("framing", 0, &addresses, None).unwrap();
            for _ in 0..8 {
                g.send(1, vec![Tensor::zeros((8, 512, 64), candle_core::DType::F32, &Device::Cpu).unwrap()]).unwrap();
            }
            g.barrier().unwrap();
            (g.bytes_sent(), g.wire_bytes_sent())
        });
        let b = scope.spawn(|| {
            let g = h.hubs[1].join("framing", 1, &addresses, None).unwrap();
            for _ in 0..8 {
                let f = g.recv(0).unwrap();
                assert_eq!(f[0].dims(), &[8, 512, 64]);
            }
            g.barrier().unwrap();
        });
        b.join().unwrap();
        a.join().unwrap()
    });
    assert_eq!(element, 8 * 8 * 512 * 64 * 4);
    let overhead = (wire - element) as f64 / element as f64;
    assert!(overhead < 0.001, "framing overhead {overhead}");
}
