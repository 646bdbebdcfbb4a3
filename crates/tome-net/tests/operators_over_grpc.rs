//! The operator suite (crates/tome-dist/tests/suite) on the gRPC peer backend: every rank a
//! thread of this test, its frames crossing real `tome.v1.Peer` streams over sockets on
//! 127.0.0.1 between two hubs (as two worker processes would), so pairs of ranks talk both
//! within one hub and across hubs.

#[path = "../../tome-dist/tests/suite/operators.rs"]
mod suite;

mod common;

use tome_dist::{Group, RankError};
use tome_net::JobSecret;

use crate::common::{hubs, launch_with};

/// Runs `f` on every rank of a new job over gRPC peer streams.
pub fn launch<T: Send, E: RankError>(p: usize, f: impl Fn(&dyn Group) -> Result<T, E> + Sync) -> Result<Vec<T>, E> {
    launch_with(p, Ok, f)
}

/// Loopback sockets exist everywhere.
pub fn available() -> bool {
    true
}

/// Ranks are threads spread over two hubs: as many as the suite asks for.
pub fn max_ranks() -> usize {
    usize::MAX
}

#[test]
fn frames_on_the_wire_cost_little_beyond_their_elements() {
    use candle_core::{Device, Tensor};
    let h = hubs();
    let addresses = vec![h.addresses[0].clone(), h.addresses[1].clone()];
    let secret = JobSecret::random();
    let (element, wire) = std::thread::scope(|scope| {
        let a = scope.spawn(|| {
            let g = h.hubs[0].join("framing", &secret, 0, &addresses, None).unwrap();
            for _ in 0..8 {
                g.send(1, vec![Tensor::zeros((8, 512, 64), candle_core::DType::F32, &Device::Cpu).unwrap()]).unwrap();
            }
            g.barrier().unwrap();
            (g.bytes_sent(), g.wire_bytes_sent())
        });
        let b = scope.spawn(|| {
            let g = h.hubs[1].join("framing", &secret, 1, &addresses, None).unwrap();
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

#[test]
fn a_receiver_that_does_not_keep_up_holds_the_sender_back() {
    use candle_core::{Device, Tensor};
    use std::time::{Duration, Instant};
    let h = hubs();
    let addresses = vec![h.addresses[0].clone(), h.addresses[1].clone()];
    let secret = JobSecret::random();
    // 16 frames of 4 MiB: far more than the inbox (4 frames), the outgoing queue (2) and the
    // HTTP/2 windows hold, so most sends must wait for the receiver.
    let frames = 16;
    let pause = Duration::from_millis(800);
    let started = Instant::now();
    let sent_all_after = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let g = h.hubs[0].join("backpressure", &secret, 0, &addresses, None).unwrap();
            for _ in 0..frames {
                g.send(1, vec![Tensor::zeros(1 << 20, candle_core::DType::F32, &Device::Cpu).unwrap()]).unwrap();
            }
            let done = started.elapsed();
            g.barrier().unwrap();
            done
        });
        let receiver = scope.spawn(|| {
            let g = h.hubs[1].join("backpressure", &secret, 1, &addresses, None).unwrap();
            std::thread::sleep(pause);
            for _ in 0..frames {
                assert_eq!(g.recv(0).unwrap()[0].dims(), &[1 << 20]);
            }
            g.barrier().unwrap();
        });
        receiver.join().unwrap();
        sender.join().unwrap()
    });
    assert!(sent_all_after >= pause, "the sender queued {frames} frames of 4 MiB in {sent_all_after:?}, before the receiver read any");
}

#[test]
fn a_rank_that_joins_after_its_job_was_cancelled_is_refused() {
    let h = hubs();
    let addresses = vec![h.addresses[0].clone(), h.addresses[1].clone()];
    let (secret, stranger) = (JobSecret::random(), JobSecret::random());
    // A cancel without the job's secret refuses nothing of it.
    assert_eq!(h.hubs[0].cancel("cancelled-early", &stranger), 0);
    // The cancel overtakes the rank's start (as a coordinator's Cancel may overtake RunShard).
    assert_eq!(h.hubs[0].cancel("cancelled-early", &secret), 0);
    let err = h.hubs[0].join("cancelled-early", &secret, 0, &addresses, None).err().expect("refused");
    assert!(matches!(err, tome_dist::DistError::Cancelled), "{err}");
    // Another job is not affected.
    assert!(h.hubs[0].join("not-cancelled", &secret, 0, &addresses[..1], None).is_ok());
}

/// Opens a `tome.v1.Peer` stream to `address` as rank `src` of `job` would, with `secret`, and
/// sends one frame of data after the open frame; returns how the stream ended.
fn intrude(address: &str, job: &str, src: u32, dst: u32, secret: Vec<u8>) -> tonic::Status {
    use tome_proto::v1 as pb;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = pb::peer_client::PeerClient::connect(format!("http://{address}")).await.unwrap();
        let frame = |step, open, secret: Vec<u8>| {
            let tensors = if open { vec![] } else { tome_net::frame_to_wire(&[candle_core::Tensor::full(1e30f32, 4, &candle_core::Device::Cpu).unwrap()]).unwrap() };
            pb::PeerFrame { job_id: job.into(), src, dst, step, tensors, open, secret }
        };
        let frames = tokio_stream::iter(vec![frame(0, true, secret), frame(0, false, vec![])]);
        match client.exchange(frames).await {
            Err(status) => status,
            Ok(acks) => {
                let mut acks = acks.into_inner();
                loop {
                    match acks.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break tonic::Status::ok("the stream was taken"),
                        Err(status) => break status,
                    }
                }
            }
        }
    })
}

#[test]
fn only_holders_of_a_jobs_secret_feed_or_stop_its_ranks() {
    let h = hubs();
    let addresses = vec![h.addresses[0].clone(), h.addresses[1].clone()];
    let (secret, stranger) = (JobSecret::random(), JobSecret::random());
    let job = "guarded";
    // The job is cancelled only once both ranks are through their barrier: a cancel drops what
    // the rank has queued, its barrier message to the sender among them.
    let through = std::sync::Barrier::new(2);
    std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            let g = h.hubs[1].join(job, &secret, 1, &addresses, None).unwrap();
            // Strangers who know the job's id, with a wrong secret or none, reach nothing.
            for offered in [stranger.to_wire(), Vec::new(), vec![0; 31]] {
                let refused = intrude(&h.addresses[1], job, 0, 1, offered);
                assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
                assert!(refused.message().contains("credential"), "{refused:?}");
            }
            // Nor does a cancel under another secret stop it.
            assert_eq!(h.hubs[1].cancel(job, &stranger), 0);
            // The rank then gets its real peer's frame, not the strangers'.
            let frame = g.recv(0).unwrap();
            assert_eq!(frame[0].to_vec1::<f32>().unwrap(), vec![1.0; 4]);
            g.barrier().unwrap();
            through.wait();
            assert_eq!(h.hubs[1].cancel(job, &secret), 1, "the job's own secret stops it");
        });
        let sender = scope.spawn(|| {
            let g = h.hubs[0].join(job, &secret, 0, &addresses, None).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(300));
            g.send(1, vec![candle_core::Tensor::ones(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap()]).unwrap();
            g.barrier().unwrap();
            through.wait();
        });
        receiver.join().unwrap();
        sender.join().unwrap();
    });
}

#[test]
fn a_rank_whose_peer_never_joins_fails_after_the_rendezvous_not_the_receive_timeout() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let limits = tome_net::PeerLimits { rendezvous_timeout: std::time::Duration::from_millis(500), ..Default::default() };
    let hub = tome_net::PeerHub::new(runtime.handle().clone(), limits);
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let service = hub.service();
    runtime.spawn(async move {
        tonic::transport::Server::builder().add_service(service).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)).await.unwrap();
    });
    // Rank 1 of the job never joins its hub.
    let group = hub.join("lonely", &JobSecret::random(), 0, &[address.clone(), address], None).unwrap();
    let started = std::time::Instant::now();
    let err = group.recv(1).unwrap_err();
    assert!(err.to_string().contains("never joined"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "waited {:?}, the receive timeout is 600 s", started.elapsed());
}
