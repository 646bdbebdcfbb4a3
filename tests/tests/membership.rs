//! One conformance suite for both membership backends, through a real coordinator's view
//! (`Info.workers`) of real worker processes: the static `--workers` list (probed) and etcd
//! (a real etcd started here; workers register with a lease). Both must: list the live workers,
//! drop one that shuts down gracefully at once and one that is killed within a few seconds, run
//! jobs on whoever is left with the embedded default's outputs, and take a worker that (re)joins.

use std::time::Duration;

use tome_e2e::*;
use tome_proto::v1 as pb;
use tome_proto::v1::tome_client::TomeClient;
use tonic::transport::Channel;
use tonic::Code;

enum Backend {
    Static,
    Etcd(Etcd),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Static => "static",
            Backend::Etcd(_) => "etcd",
        }
    }

    fn worker_args(&self) -> Vec<String> {
        match self {
            Backend::Static => Vec::new(),
            Backend::Etcd(e) => vec!["--etcd".into(), e.endpoint.clone(), "--etcd-ttl-seconds".into(), "2".into()],
        }
    }

    /// `addresses`: every address a worker will listen on (a static list names them all).
    fn coordinator_args(&self, addresses: &[String]) -> Vec<String> {
        match self {
            Backend::Static => vec!["--workers".into(), addresses.join(","), "--probe-ms".into(), "200".into()],
            Backend::Etcd(e) => vec!["--etcd".into(), e.endpoint.clone()],
        }
    }
}

fn log(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tome-membership-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.log"))
}

async fn live(client: &mut TomeClient<Channel>) -> Vec<String> {
    client.info(pb::InfoRequest {}).await.unwrap().into_inner().workers
}

/// Waits until the coordinator lists exactly `want` (as "name@address", names being addresses).
async fn wait_live(client: &mut TomeClient<Channel>, want: &[&str], within: Duration, what: &str) {
    let deadline = std::time::Instant::now() + within;
    let mut want: Vec<String> = want.iter().map(|a| format!("{a}@{a}")).collect();
    want.sort();
    loop {
        let got = live(client).await;
        if got == want {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: the coordinator lists {got:?}, not {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn job(text: &str, ranks: u32) -> pb::ProcessRequest {
    let options = pb::ProcessOptions {
        attention: Some(pb::AttentionOverride { kind: pb::AttentionKind::Window as i32, window: 64, ..Default::default() }),
        position_extension: pb::PositionExtension::Tile as i32,
        ranks,
        ..Default::default()
    };
    pb::ProcessRequest { model: String::new(), input: Some(pb::process_request::Input::Text(text.as_bytes().to_vec())), options: Some(options) }
}

async fn conformance(backend: Backend) {
    let Some(model) = minilm() else { return };
    let name = backend.name();
    let text = TEXT.repeat(8);
    let reference = {
        let server = start_server(&model, &[]).await;
        let mut client = TomeClient::connect(server.addr.clone()).await.unwrap();
        process_call(&mut client, job(&text, 4)).await.unwrap()
    };
    let worker_args = backend.worker_args();
    let worker_args: Vec<&str> = worker_args.iter().map(String::as_str).collect();
    let mut workers = Vec::new();
    for i in 0..3 {
        workers.push(start_worker(&model, &worker_args, log(&format!("{name}-w{i}"))).await);
    }
    let addresses: Vec<String> = workers.iter().map(|w| w.host_port.clone()).collect();
    let coordinator_args = backend.coordinator_args(&addresses);
    let coordinator_args: Vec<&str> = coordinator_args.iter().map(String::as_str).collect();
    let coordinator = start_coordinator(&model, &coordinator_args, log(&format!("{name}-c"))).await;
    let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
    let a: Vec<&str> = addresses.iter().map(String::as_str).collect();

    wait_live(&mut client, &a, Duration::from_secs(20), "all workers up").await;
    let got = process_call(&mut client, job(&text, 4)).await.unwrap();
    assert!(max_diff(&got.document, &reference.document) <= 1e-5, "{name}: 3 workers");

    // A graceful shutdown (SIGTERM): the worker leaves at once and exits cleanly.
    workers[0].terminate();
    assert_eq!(workers[0].wait_exit(Duration::from_secs(20)), Some(0), "{name}: worker 0 exit");
    wait_live(&mut client, &a[1..], Duration::from_secs(5), "after SIGTERM").await;

    // A crash (SIGKILL): gone once the probes fail or the lease expires.
    workers[1].child.kill().unwrap();
    let _ = workers[1].child.wait();
    wait_live(&mut client, &a[2..], Duration::from_secs(15), "after SIGKILL").await;
    let got = process_call(&mut client, job(&text, 4)).await.unwrap();
    assert!(max_diff(&got.document, &reference.document) <= 1e-5, "{name}: 4 ranks on the last worker");

    // A worker (re)joining at a known address is planned on again.
    let back = start_worker_at(&model, &worker_args, log(&format!("{name}-w0-again")), addresses[0].clone()).await;
    wait_live(&mut client, &[a[0], a[2]], Duration::from_secs(15), "after rejoining").await;
    let got = process_call(&mut client, job(&text, 4)).await.unwrap();
    assert!(max_diff(&got.document, &reference.document) <= 1e-5, "{name}: after rejoining");

    // No worker left: UNAVAILABLE, and the coordinator still answers.
    drop(back);
    workers[2].child.kill().unwrap();
    let _ = workers[2].child.wait();
    wait_live(&mut client, &[], Duration::from_secs(15), "no workers").await;
    let err = process_call(&mut client, job(&text, 2)).await.err().unwrap();
    assert_eq!(err.code(), Code::Unavailable, "{name}: {err:?}");
    assert!(client.info(pb::InfoRequest {}).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_membership_conforms() {
    conformance(Backend::Static).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_membership_conforms() {
    conformance(Backend::Etcd(Etcd::start().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_while_etcd_is_down_serves_and_registers_once_it_is_back() {
    let Some(model) = minilm() else { return };
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    // Nothing listens at the endpoint yet: the worker starts and reports SERVING all the same.
    let worker = start_worker(&model, &["--etcd", &endpoint, "--etcd-ttl-seconds", "2"], log("etcd-down-w")).await;
    let etcd = Etcd::start_at(port).await;
    let coordinator = start_coordinator(&model, &["--etcd", &etcd.endpoint], log("etcd-down-c")).await;
    let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
    wait_live(&mut client, &[worker.host_port.as_str()], Duration::from_secs(20), "registered once etcd is back").await;
    let got = process_call(&mut client, job(&TEXT.repeat(8), 2)).await.unwrap();
    assert_eq!(got.kinds.last(), Some(&"done"));
    assert!(worker.log_text().contains("etcd is unreachable"), "the worker said why it was not registered yet");
}

/// Writes a worker entry into etcd as anyone with write access could.
async fn register_by_hand(etcd: &str, name: &str, address: &str) {
    use prost::Message;
    let mut client = etcd_client::Client::connect([etcd], None).await.unwrap();
    let info = pb::WorkerInfo { name: name.into(), address: address.into(), ..Default::default() };
    client.put(format!("/tome/workers/{name}"), info.encode_to_vec(), None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_entries_place_only_workers_that_answer_as_themselves_and_the_dead_drop_out_whatever_etcd_says() {
    let Some(model) = minilm() else { return };
    let mut etcd = Etcd::start().await;
    // Leases far longer than the test: only the coordinator's probes can drop a dead worker.
    let worker_args = ["--etcd", &etcd.endpoint, "--etcd-ttl-seconds", "600"];
    let mut workers = Vec::new();
    for i in 0..2 {
        workers.push(start_worker(&model, &worker_args, log(&format!("identity-w{i}"))).await);
    }
    let coordinator = start_coordinator(&model, &["--etcd", &etcd.endpoint, "--probe-ms", "200"], log("identity-c")).await;
    let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
    let addresses: Vec<String> = workers.iter().map(|w| w.host_port.clone()).collect();
    let a: Vec<&str> = addresses.iter().map(String::as_str).collect();
    wait_live(&mut client, &a, Duration::from_secs(20), "both workers registered").await;

    // Entries written by hand, named to sort first: one at a real worker's address (which
    // answers with its own name), one where nothing answers. Neither is planned on.
    register_by_hand(&etcd.endpoint, "aaa-impostor", a[0]).await;
    register_by_hand(&etcd.endpoint, "aab-nowhere", &format!("127.0.0.1:{}", free_port())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_live(&mut client, &a, Duration::from_secs(1), "the impostors are not members").await;
    assert!(coordinator.log_text().contains("not who answers at its address"), "the coordinator says why it refused the impostor");
    let text = TEXT.repeat(8);
    let got = process_call(&mut client, job(&text, 2)).await.unwrap();
    assert_eq!(got.kinds.last(), Some(&"done"));

    // A worker killed while its lease has minutes left is dropped within seconds.
    workers[0].child.kill().unwrap();
    let _ = workers[0].child.wait();
    let killed = std::time::Instant::now();
    wait_live(&mut client, &a[1..], Duration::from_secs(5), "a dead worker whose entry remains").await;
    eprintln!("a killed worker was dropped {:?} after the kill", killed.elapsed());

    // etcd goes away: jobs keep running on the last membership known.
    etcd.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = process_call(&mut client, job(&text, 2)).await.unwrap();
    assert_eq!(got.kinds.last(), Some(&"done"), "a job during an etcd outage");
    wait_live(&mut client, &a[1..], Duration::from_secs(1), "during the outage").await;
}
