//! TLS on every listener: a cluster whose coordinator and workers speak mutual TLS under a
//! throwaway cluster CA runs documents end to end (coordinator -> workers, worker <-> worker
//! peer streams, the CLI -> coordinator), while plaintext callers, callers without a
//! certificate and callers with another CA's certificate are refused; and a listener beyond
//! loopback without TLS refuses to start unless `--insecure-plaintext` says so. etcd over TLS
//! with authentication: workers register and coordinators watch with the etcd CA and a user's
//! password from a file.

use std::process::Command;
use std::time::{Duration, Instant};

use tome_e2e::*;
use tome_proto::v1 as pb;
use tome_proto::v1::tome_client::TomeClient;
use tome_proto::v1::worker_client::WorkerClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A channel to `host_port` over TLS with `tls` (or plaintext); `Err` when no call can be made.
async fn channel(host_port: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{host_port}")).unwrap().connect_timeout(Duration::from_secs(5)).timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// A worker's `Info` as a caller with `tls` sees it: `Err` when the connection or the call is
/// refused.
async fn worker_info(host_port: &str, tls: Option<ClientTlsConfig>) -> Result<pb::WorkerInfo, String> {
    let mut client = WorkerClient::new(channel(host_port, tls).await?);
    client.info(pb::WorkerInfoRequest {}).await.map(|r| r.into_inner()).map_err(|s| format!("{s:?}"))
}

/// A worker's `RunShard` as a caller with `tls` makes it (an empty request: a member would get
/// INVALID_ARGUMENT back; a stranger gets no answer at all).
async fn worker_run_shard(host_port: &str, tls: Option<ClientTlsConfig>) -> Result<tonic::Code, String> {
    let mut client = WorkerClient::new(channel(host_port, tls).await?);
    match client.run_shard(pb::ShardRequest::default()).await {
        Ok(_) => Ok(tonic::Code::Ok),
        // A status the worker itself sent has no transport error behind it.
        Err(s) if s.code() == tonic::Code::InvalidArgument => Ok(s.code()),
        Err(s) => Err(format!("{s:?}")),
    }
}

async fn coordinator_info(host_port: &str, tls: Option<ClientTlsConfig>) -> Result<pb::InfoResponse, String> {
    let mut client = TomeClient::new(channel(host_port, tls).await?);
    client.info(pb::InfoRequest {}).await.map(|r| r.into_inner()).map_err(|s| format!("{s:?}"))
}

fn tome(args: &[&str]) -> std::process::Output {
    Command::new(tome_bin()).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_over_mutual_tls_runs_documents_and_refuses_strangers() {
    let Some(model) = minilm() else { return };
    let pki = Pki::new("cluster");
    let dir = std::env::temp_dir().join(format!("tome-tls-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let member = || Some(pki.client("ca", Some("client")));

    // Two workers, each taking calls only from holders of a cluster certificate.
    let worker_flags = pki.server_flags("worker");
    let mut workers = Vec::new();
    for i in 0..2 {
        let model = model.to_string_lossy();
        let mut args = vec!["--log", "info,tome_net=debug", "serve", "worker", "--model", &model];
        args.extend(worker_flags.iter().map(String::as_str));
        workers.push(spawn_serving_tls(&args, "tome.v1.Worker", Some(dir.join(format!("worker{i}.log"))), "127.0.0.1:0".into(), member()).await);
    }
    let addresses = workers.iter().map(|w| w.host_port.clone()).collect::<Vec<_>>().join(",");

    // The coordinator: TLS beyond loopback (every interface; called at 127.0.0.1), its callers
    // checked against the cluster CA, and its calls to workers over TLS with its own certificate.
    let model_arg = model.to_string_lossy();
    let mut args = vec!["--log", "info", "serve", "coordinator", "--model", &model_arg, "--max-ranks", "8", "--workers", &addresses, "--probe-ms", "200"];
    let coordinator_flags = pki.server_flags("coordinator");
    args.extend(coordinator_flags.iter().map(String::as_str));
    let ca = pki.path("ca.pem");
    args.extend(["--tls-ca", &ca]);
    let coordinator = spawn_serving_tls(&args, "tome.v1.Tome", Some(dir.join("coordinator.log")), "0.0.0.0:0".into(), member()).await;
    assert!(coordinator.addr.starts_with("https://127.0.0.1:"), "{}", coordinator.addr);

    // The coordinator's probes reach both workers over TLS.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = coordinator_info(&coordinator.host_port, member()).await.unwrap();
        if info.workers.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the coordinator saw {:?}, not 2 workers; its log:\n{}", info.workers, coordinator.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // (a) A document runs end to end over TLS: caller -> coordinator -> two workers, whose two
    // ranks exchange frames over TLS peer streams.
    let mut client = TomeClient::new(channel(&coordinator.host_port, member()).await.unwrap());
    let text = TEXT.repeat(8);
    let options = pb::ProcessOptions { outputs: vec![pb::Output::DocumentEmbedding as i32, pb::Output::ChunkEmbeddings as i32], ranks: 2, ..Default::default() };
    let got = process_call(&mut client, text_request(text.as_bytes(), options)).await.unwrap();
    assert_eq!(got.document.len(), 384);
    let done = got.done.unwrap_or_else(|| panic!("no Done event: {:?}", got.kinds));
    assert!(!got.chunks.is_empty());
    // The two ranks ran on the two workers and sent each other frames over the wire.
    assert!(done.bytes_exchanged > 0 && done.wire_bytes_exchanged > 0, "{done:?}");

    // The CLI over TLS, with a client certificate: the same outputs as the embedded default.
    let doc = dir.join("doc.txt");
    std::fs::write(&doc, &text).unwrap();
    let doc = doc.to_string_lossy().into_owned();
    let (remote, local) = (dir.join("remote"), dir.join("local"));
    let client_cert = pki.path("client.pem");
    let client_key = pki.path("client.key");
    let tls_flags = ["--tls-ca", ca.as_str(), "--tls-cert", client_cert.as_str(), "--tls-key", client_key.as_str()];
    let mut args = vec!["process", &doc, "--coordinator", &coordinator.host_port, "--ranks", "2", "--quiet", "--out"];
    let remote_arg = remote.to_string_lossy();
    args.push(&remote_arg);
    args.extend(tls_flags);
    let run = tome(&args);
    assert!(run.status.success(), "tome process over TLS: {}", String::from_utf8_lossy(&run.stderr));
    let local_arg = local.to_string_lossy();
    let run = tome(&["process", &doc, "--model", &model_arg, "--ranks", "1", "--quiet", "--out", &local_arg]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let (over_tls, embedded) = (read_npy(&remote.join("document_embedding.npy")), read_npy(&local.join("document_embedding.npy")));
    assert!(max_diff(&over_tls, &embedded) <= 1e-5, "the cluster over TLS gives the embedded default's outputs");
    let mut args = vec!["info", "--coordinator", &coordinator.host_port];
    args.extend(tls_flags);
    let info = tome(&args);
    assert!(info.status.success(), "tome info over TLS: {}", String::from_utf8_lossy(&info.stderr));

    // (b) Plaintext callers are refused by TLS servers: the coordinator, a worker, the CLI.
    assert!(coordinator_info(&coordinator.host_port, None).await.is_err(), "a plaintext call to the coordinator");
    assert!(worker_info(&workers[0].host_port, None).await.is_err(), "a plaintext call to a worker");
    let plain = tome(&["info", "--coordinator", &coordinator.host_port]);
    assert!(!plain.status.success(), "tome info in plaintext to a TLS coordinator");
    // The coordinator's certificate is checked too: a client trusting another CA does not talk to it.
    assert!(coordinator_info(&coordinator.host_port, Some(pki.client("stranger-ca", Some("stranger")))).await.is_err());

    // (c) Worker and Peer take calls only from cluster members: no certificate, or another
    // CA's certificate, and the handshake fails; a member's call is answered.
    for (who, tls) in [("no certificate", pki.client("ca", None)), ("another CA's certificate", pki.client("ca", Some("stranger")))] {
        for w in &workers {
            let info = worker_info(&w.host_port, Some(tls.clone())).await;
            assert!(info.is_err(), "Worker.Info from a caller with {who} was answered: {info:?}");
            let shard = worker_run_shard(&w.host_port, Some(tls.clone())).await;
            assert!(shard.is_err(), "Worker.RunShard from a caller with {who} was answered: {shard:?}");
        }
        assert!(coordinator_info(&coordinator.host_port, Some(tls)).await.is_err(), "the coordinator checks its callers too ({who})");
    }
    for w in &workers {
        assert_eq!(worker_info(&w.host_port, member()).await.unwrap().address, w.host_port);
        assert_eq!(worker_run_shard(&w.host_port, member()).await, Ok(tonic::Code::InvalidArgument), "a member's RunShard reaches the worker");
    }

    // The coordinator still runs documents after the strangers' attempts.
    let options = pb::ProcessOptions { outputs: vec![pb::Output::DocumentEmbedding as i32], ranks: 2, ..Default::default() };
    let again = process_call(&mut client, text_request(text.as_bytes(), options.clone())).await.unwrap();
    assert!(max_diff(&again.document, &got.document) <= 1e-6);

    // A coordinator whose public certificate another CA signed (as a public CA would) presents
    // its cluster certificate to the workers.
    let (stranger_cert, stranger_key, cluster_cert, cluster_key) = (pki.path("stranger.pem"), pki.path("stranger.key"), pki.path("coordinator.pem"), pki.path("coordinator.key"));
    let args = [
        "serve",
        "coordinator",
        "--model",
        &model_arg,
        "--max-ranks",
        "8",
        "--workers",
        &addresses,
        "--probe-ms",
        "200",
        "--tls-cert",
        &stranger_cert,
        "--tls-key",
        &stranger_key,
        "--tls-ca",
        &ca,
        "--cluster-tls-cert",
        &cluster_cert,
        "--cluster-tls-key",
        &cluster_key,
    ];
    let public_ca = || Some(pki.client("stranger-ca", None));
    let public = spawn_serving_tls(&args, "tome.v1.Tome", Some(dir.join("public-coordinator.log")), "127.0.0.1:0".into(), public_ca()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while coordinator_info(&public.host_port, public_ca()).await.unwrap().workers.len() != 2 {
        assert!(Instant::now() < deadline, "the workers took no calls from the cluster identity; its log:\n{}", public.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut public_client = TomeClient::new(channel(&public.host_port, public_ca()).await.unwrap());
    let via_public = process_call(&mut public_client, text_request(text.as_bytes(), options)).await.unwrap();
    assert!(max_diff(&via_public.document, &got.document) <= 1e-6);
    drop(workers);
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs `tome ARGS` expecting a refusal at start-up; returns its stderr.
fn refused(args: &[&str]) -> String {
    let out = Command::new(tome_bin()).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "tome {args:?} started; stderr:\n{stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_plaintext_is_refused_unless_insecure_plaintext_says_so() {
    let Some(model) = minilm() else { return };
    let model = model.to_string_lossy();
    let pki = Pki::new("listen");
    let dir = std::env::temp_dir().join(format!("tome-tls-listen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // Every server refuses plaintext on every interface, saying how to go on.
    for args in [
        vec!["run", "--model", &model, "--listen", "0.0.0.0:0"],
        vec!["serve", "coordinator", "--model", &model, "--workers", "127.0.0.1:1", "--listen", "0.0.0.0:0"],
        vec!["serve", "worker", "--model", &model, "--listen", "0.0.0.0:0"],
        vec!["serve", "worker", "--model", &model, "--listen", "[::]:0"],
        // The metrics listener too.
        vec!["run", "--model", &model, "--metrics-listen", "0.0.0.0:0"],
    ] {
        let stderr = refused(&args);
        assert!(stderr.contains("refusing to listen on") && stderr.contains("in plaintext") && stderr.contains("--insecure-plaintext"), "{stderr}");
    }

    // Bad TLS settings are refused at start-up, naming the file or the missing flag.
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let junk = junk.to_string_lossy().into_owned();
    let stderr = refused(&["serve", "worker", "--model", &model, "--tls-cert", &junk, "--tls-key", &pki.path("worker.key"), "--tls-client-ca", &pki.path("ca.pem")]);
    assert!(stderr.contains("--tls-cert") && stderr.contains(&junk), "{stderr}");
    let stderr = refused(&["serve", "worker", "--model", &model, "--tls-cert", &pki.path("worker.pem"), "--tls-key", &pki.path("worker.key")]);
    assert!(stderr.contains("--tls-client-ca"), "a worker over TLS takes calls only from cluster members: {stderr}");
    let stderr = refused(&[
        "serve",
        "worker",
        "--model",
        &model,
        "--listen",
        "0.0.0.0:0",
        "--insecure-plaintext",
        "--tls-cert",
        &pki.path("worker.pem"),
        "--tls-key",
        &pki.path("worker.key"),
    ]);
    assert!(stderr.contains("--insecure-plaintext") && stderr.contains("--tls-cert"), "{stderr}");

    // With --insecure-plaintext it starts, and says loudly what it is doing.
    let log = dir.join("insecure.log");
    let args = ["--log", "info", "serve", "worker", "--model", &model, "--insecure-plaintext"];
    let worker = spawn_serving_at(&args, "tome.v1.Worker", Some(log.clone()), "0.0.0.0:0".into()).await;
    assert!(worker_info(&worker.host_port, None).await.is_ok());
    let text = worker.log_text();
    assert!(text.contains("WARN") && text.contains("INSECURE") && text.contains("--insecure-plaintext"), "{text}");

    // Loopback without TLS is as it always was; TLS is allowed anywhere.
    let args = ["serve", "worker", "--model", &model];
    let plain = spawn_serving_at(&args, "tome.v1.Worker", None, "127.0.0.1:0".into()).await;
    assert!(worker_info(&plain.host_port, None).await.is_ok());
    let mut args = vec!["run", "--model", &*model, "--metrics-listen", "0.0.0.0:0"];
    let flags = pki.server_flags("coordinator");
    args.extend(flags.iter().map(String::as_str));
    let tls = spawn_serving_tls(&args, "tome.v1.Tome", None, "0.0.0.0:0".into(), Some(pki.client("ca", Some("client")))).await;
    assert_eq!(coordinator_info(&tls.host_port, Some(pki.client("ca", Some("client")))).await.unwrap().backend, "embedded");
    // Its metrics beyond loopback are HTTPS with the server's certificate, for scrapers that
    // hold a certificate the client CA signed.
    let metrics = tls.metrics.as_deref().unwrap().replace("0.0.0.0", "127.0.0.1");
    let page = https_get(&metrics, "/metrics", &pki, Some("client")).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(https_get(&metrics, "/metrics", &pki, None).await.is_err(), "a scraper without a certificate");
    assert!(!try_http_get(&metrics, "/metrics").is_ok_and(|page| page.starts_with("HTTP/1.1 200")), "plaintext to the TLS metrics listener");
    drop((worker, plain, tls));
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_and_coordinators_watch_over_tls_to_an_etcd_that_checks_credentials() {
    let Some(model) = minilm() else { return };
    let pki = Pki::new("etcd");
    let etcd = Etcd::start_tls(&pki.dir.join("etcd.pem"), &pki.dir.join("etcd.key")).await;
    // The etcd CA (here the cluster CA) and a root user; from now on etcd answers only
    // authenticated calls.
    let etcd_tls = etcd_client::TlsOptions::new().ca_certificate(Certificate::from_pem(pki.read("ca.pem")));
    let mut admin = etcd_client::Client::connect([&etcd.endpoint], Some(etcd_client::ConnectOptions::new().with_tls(etcd_tls.clone()))).await.unwrap();
    admin.user_add("root", "root-password-0123", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    let mut anonymous = etcd_client::Client::connect([&etcd.endpoint], Some(etcd_client::ConnectOptions::new().with_tls(etcd_tls))).await.unwrap();
    assert!(anonymous.put("/tome/workers/intruder", "x", None).await.is_err(), "etcd refuses writes without credentials");

    let password = pki.dir.join("etcd-password");
    std::fs::write(&password, "root-password-0123\n").unwrap();
    let (ca, password) = (pki.path("ca.pem"), password.to_string_lossy().into_owned());
    let etcd_flags = ["--etcd", etcd.endpoint.as_str(), "--etcd-ca", &ca, "--etcd-user", "root", "--etcd-password-file", &password];
    let model_arg = model.to_string_lossy();
    let mut args = vec!["serve", "worker", "--model", &model_arg, "--etcd-ttl-seconds", "5"];
    args.extend(etcd_flags);
    let dir = std::env::temp_dir().join(format!("tome-tls-etcd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _worker = spawn_serving(&args, "tome.v1.Worker", Some(dir.join("worker.log"))).await;
    let mut args = vec!["serve", "coordinator", "--model", &model_arg, "--probe-ms", "200"];
    args.extend(etcd_flags);
    let coordinator = spawn_serving(&args, "tome.v1.Tome", Some(dir.join("coordinator.log"))).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while coordinator_info(&coordinator.host_port, None).await.unwrap().workers.len() != 1 {
        assert!(Instant::now() < deadline, "the worker never showed up through etcd; coordinator log:\n{}", coordinator.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = TomeClient::connect(coordinator.addr.clone()).await.unwrap();
    let got = process_call(&mut client, text_request(TEXT.as_bytes(), Default::default())).await.unwrap();
    assert_eq!(got.kinds.last(), Some(&"done"));

    // Each flag is checked where it is given: TLS without its scheme, a user without a password.
    let e = refused(&["serve", "coordinator", "--model", &model_arg, "--etcd", etcd.endpoint.as_str()]);
    assert!(e.contains("--etcd-ca"), "{e}");
    let plain = etcd.endpoint.replace("https://", "http://");
    let e = refused(&["serve", "coordinator", "--model", &model_arg, "--etcd", &plain, "--etcd-ca", &ca]);
    assert!(e.contains("https://"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Replaces `to` with `from` in one step, as a Secret's update is seen by the pod.
fn replace_file(from: &std::path::Path, to: &std::path::Path) {
    let staged = to.with_extension("staged");
    std::fs::copy(from, &staged).unwrap();
    std::fs::rename(&staged, to).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_and_client_cas_take_effect_without_a_restart() {
    let Some(model) = minilm() else { return };
    let pki = Pki::new("rotate");
    // The server reads its files from a directory of its own, as from a mounted Secret.
    let live = pki.dir.join("live");
    std::fs::create_dir_all(&live).unwrap();
    for (from, to) in [("coordinator.pem", "tls.crt"), ("coordinator.key", "tls.key"), ("ca.pem", "client-ca.crt")] {
        std::fs::copy(pki.dir.join(from), live.join(to)).unwrap();
    }
    let (cert, key, client_ca) = (live.join("tls.crt"), live.join("tls.key"), live.join("client-ca.crt"));
    let model_arg = model.to_string_lossy();
    let args =
        ["--log", "info", "run", "--model", &model_arg, "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(), "--tls-client-ca", client_ca.to_str().unwrap()];
    let (old, new) = (Some(pki.client("ca", Some("client"))), Some(pki.client("stranger-ca", Some("stranger"))));
    let server = spawn_serving_tls(&args, "tome.v1.Tome", Some(pki.dir.join("server.log")), "127.0.0.1:0".into(), old.clone()).await;
    assert!(coordinator_info(&server.host_port, old.clone()).await.is_ok());
    assert!(coordinator_info(&server.host_port, new.clone()).await.is_err(), "the other CA is not trusted yet");

    // Rotation: a certificate from another CA, and that CA for the callers.
    replace_file(&pki.dir.join("stranger.pem"), &cert);
    replace_file(&pki.dir.join("stranger.key"), &key);
    replace_file(&pki.dir.join("stranger-ca.pem"), &client_ca);
    let deadline = Instant::now() + Duration::from_secs(20);
    while coordinator_info(&server.host_port, new.clone()).await.is_err() {
        assert!(Instant::now() < deadline, "the rotated files were not picked up; the server's log:\n{}", server.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(coordinator_info(&server.host_port, old).await.is_err(), "the old identity and CA are gone");
    assert!(server.log_text().contains("reloaded TLS files"), "{}", server.log_text());

    // Files that cannot be used (a key that is not the certificate's) leave the server as it was.
    replace_file(&pki.dir.join("worker.key"), &key);
    tokio::time::sleep(tome_server_reload_check() * 2).await;
    assert!(coordinator_info(&server.host_port, new).await.is_ok(), "a bad rotation keeps the previous configuration");
    assert!(server.log_text().contains("cannot be used; keeping the previous ones"), "{}", server.log_text());
}

/// How often servers look at their TLS files (tome_server::tls::RELOAD_CHECK).
fn tome_server_reload_check() -> Duration {
    Duration::from_secs(2)
}

/// GET `path` over HTTPS from `addr`, trusting the cluster CA and presenting `identity`'s
/// certificate, if any; `Err` when the handshake or the exchange fails.
async fn https_get(addr: &str, path: &str, pki: &Pki, identity: Option<&str>) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pki.read("ca.pem")) {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap().with_root_certificates(roots);
    let mut config = match identity {
        Some(who) => {
            let chain = CertificateDer::pem_slice_iter(&pki.read(&format!("{who}.pem"))).collect::<Result<Vec<_>, _>>().unwrap();
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(&pki.read(&format!("{who}.key"))).unwrap()).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut stream = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| e.to_string())?;
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let mut page = String::new();
    stream.read_to_string(&mut page).await.map_err(|e| e.to_string())?;
    if page.is_empty() {
        return Err("no answer".into());
    }
    Ok(page)
}
