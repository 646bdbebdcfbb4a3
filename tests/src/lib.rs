//! Helpers for the end-to-end tests: the `tome` binary as real processes on 127.0.0.1 ports
//! (the embedded server, coordinators, workers), a real etcd, and a gRPC client.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tome_proto::v1 as pb;
use tome_proto::v1::tome_client::TomeClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `tome` binary built alongside this test (same target dir and profile).
pub fn tome_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let bin = dir.join("tome");
    assert!(bin.is_file(), "{} missing: build it first (`cargo build -p tome-cli`; scripts/test.sh does)", bin.display());
    bin
}

pub fn minilm() -> Option<PathBuf> {
    let data = std::env::var("TOME_DATA_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("data"));
    let path = data.join("models/all-MiniLM-L6-v2");
    if path.join("model.safetensors").is_file() {
        return Some(path);
    }
    assert!(std::env::var_os("CI").is_none(), "CI must fetch the MiniLM model first (scripts/fetch_data.sh)");
    eprintln!("skipping: {} missing; run scripts/fetch_data.sh", path.display());
    None
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `tome` process, killed when dropped.
pub struct Server {
    pub child: Child,
    /// `http://127.0.0.1:PORT` (`https://` for a server spawned with a client TLS configuration)
    pub addr: String,
    /// `127.0.0.1:PORT`
    pub host_port: String,
    /// Its stderr (logs), when captured.
    pub log: Option<PathBuf>,
    /// `127.0.0.1:PORT` of its Prometheus endpoint, when started with `--metrics-listen`.
    pub metrics: Option<String>,
}

impl Server {
    /// Sends SIGTERM (a graceful shutdown).
    pub fn terminate(&self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid; it reads no memory of ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    /// Waits for the process to exit; its exit code, or None if it outlived `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tome ARGS --listen 127.0.0.1:0` and waits until its health service answers for
/// `service`: the server is up. A worker and `tome run` are SERVING by then; a coordinator of a
/// cluster is SERVING only once a worker is live (wait for that apart, e.g. with its Info).
/// With `log`, stderr goes to that file.
pub async fn spawn_serving(args: &[&str], service: &str, log: Option<PathBuf>) -> Server {
    spawn_serving_at(args, service, log, "127.0.0.1:0".into()).await
}

/// As [`spawn_serving`], listening on `listen`. The port a server got is the one it prints
/// (`tome listening on ADDR`), so port 0 never races with other tests for a free port.
pub async fn spawn_serving_at(args: &[&str], service: &str, log: Option<PathBuf>, listen: String) -> Server {
    spawn_serving_tls(args, service, log, listen, None).await
}

/// As [`spawn_serving_at`], for a server that speaks TLS when `tls` is given: its health is
/// asked over TLS with `tls`, and its `addr` is `https://`. A server listening on every
/// interface (0.0.0.0, ::) is called at 127.0.0.1, so no test sends traffic beyond loopback.
pub async fn spawn_serving_tls(args: &[&str], service: &str, log: Option<PathBuf>, listen: String, tls: Option<ClientTlsConfig>) -> Server {
    let mut cmd = Command::new(tome_bin());
    cmd.args(args).args(["--listen", &listen]).stdout(Stdio::piped());
    if let Some(path) = &log {
        cmd.stderr(std::fs::File::create(path).unwrap());
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    // `tome metrics on ADDR` comes first when metrics are served, then `tome listening on ADDR`.
    let lines = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            let last = line.starts_with("tome listening on ");
            lines.push(line);
            if last {
                break;
            }
        }
        std::io::Result::Ok(lines)
    });
    let lines = tokio::time::timeout(Duration::from_secs(120), lines).await.expect("the server did not say where it listens").unwrap().unwrap();
    let after = |prefix: &str| lines.iter().find_map(|l| l.trim().strip_prefix(prefix).map(str::to_string));
    let host_port = after("tome listening on ").unwrap_or_else(|| panic!("the server exited before listening; it printed {lines:?}"));
    let bound: std::net::SocketAddr = host_port.parse().unwrap();
    let host_port = if bound.ip().is_unspecified() { format!("127.0.0.1:{}", bound.port()) } else { host_port };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = Server { child, addr: format!("{scheme}://{host_port}"), host_port, log, metrics: after("tome metrics on ") };
    wait_answering_tls(&server.addr, service, Duration::from_secs(60), tls.as_ref()).await;
    server
}

/// Waits until `addr`'s health service answers for `service`, SERVING or NOT_SERVING.
pub async fn wait_answering_tls(addr: &str, service: &str, limit: Duration, tls: Option<&ClientTlsConfig>) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let deadline = Instant::now() + limit;
    loop {
        let status = health_tls(addr, service, tls).await;
        if status == Some(ServingStatus::Serving as i32) || status == Some(ServingStatus::NotServing as i32) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr}'s health did not answer for {service}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The health status `addr` reports for `service`, if it answers.
pub async fn health(addr: &str, service: &str) -> Option<i32> {
    health_tls(addr, service, None).await
}

/// As [`health`], over TLS with `tls`.
pub async fn health_tls(addr: &str, service: &str, tls: Option<&ClientTlsConfig>) -> Option<i32> {
    let mut endpoint = Channel::from_shared(addr.to_string()).ok()?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone()).ok()?;
    }
    let ch = endpoint.connect().await.ok()?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(ch);
    let req = tonic_health::pb::HealthCheckRequest { service: service.into() };
    Some(client.check(req).await.ok()?.into_inner().status)
}

/// The embedded default (`tome run`), 2 ranks per job unless `extra` says otherwise.
pub async fn start_server(model: &Path, extra: &[&str]) -> Server {
    let model = model.to_string_lossy();
    let mut args = vec!["run", "--model", &model, "--ranks", "2", "--max-ranks", "8"];
    args.extend_from_slice(extra);
    spawn_serving(&args, "tome.v1.Tome", None).await
}

/// A worker process (`tome serve worker`), logging to `log`.
pub async fn start_worker(model: &Path, extra: &[&str], log: PathBuf) -> Server {
    start_worker_at(model, extra, log, "127.0.0.1:0".into()).await
}

/// A worker process listening on `host_port`.
pub async fn start_worker_at(model: &Path, extra: &[&str], log: PathBuf, host_port: String) -> Server {
    let model = model.to_string_lossy();
    let mut args = vec!["--log", "info,tome_net=debug", "serve", "worker", "--model", &model];
    args.extend_from_slice(extra);
    spawn_serving_at(&args, "tome.v1.Worker", Some(log), host_port).await
}

/// A coordinator process (`tome serve coordinator`), logging to `log`.
pub async fn start_coordinator(model: &Path, extra: &[&str], log: PathBuf) -> Server {
    let model = model.to_string_lossy();
    let mut args = vec!["--log", "info", "serve", "coordinator", "--model", &model, "--max-ranks", "8"];
    args.extend_from_slice(extra);
    spawn_serving(&args, "tome.v1.Tome", Some(log)).await
}

/// A real etcd on free 127.0.0.1 ports with its own data directory, killed when dropped.
pub struct Etcd {
    child: Child,
    pub endpoint: String,
    dir: PathBuf,
}

impl Etcd {
    /// Starts Debian's `etcd` (package etcd-server, which `.ci/run` installs) and waits for it.
    pub async fn start() -> Etcd {
        Etcd::start_at(free_port()).await
    }

    /// Starts etcd serving clients at 127.0.0.1:`client`.
    pub async fn start_at(client: u16) -> Etcd {
        Etcd::start_with(client, None).await
    }

    /// Starts etcd serving clients over TLS with `cert` and `key` (PEM files; the certificate
    /// names 127.0.0.1) at a free port: its endpoint is `https://127.0.0.1:PORT`.
    pub async fn start_tls(cert: &Path, key: &Path) -> Etcd {
        Etcd::start_with(free_port(), Some((cert, key))).await
    }

    async fn start_with(client: u16, tls: Option<(&Path, &Path)>) -> Etcd {
        let peer = free_port();
        let dir = std::env::temp_dir().join(format!("tome-etcd-{}-{client}", std::process::id()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let mut command = Command::new("etcd");
        command
            .args(["--name", "tome-test", "--data-dir"])
            .arg(&dir)
            .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("tome-test=http://127.0.0.1:{peer}")]);
        if let Some((cert, key)) = tls {
            command.arg("--cert-file").arg(cert).arg("--key-file").arg(key);
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("cannot start etcd ({e}): install Debian's etcd-server (.ci/run does)"));
        let etcd = Etcd { child, endpoint, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(format!("127.0.0.1:{client}")).is_err() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    /// Kills etcd now (an outage), keeping its data directory.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn text_request(text: &[u8], options: pb::ProcessOptions) -> pb::ProcessRequest {
    pb::ProcessRequest { model: String::new(), input: Some(pb::process_request::Input::Text(text.to_vec())), options: Some(options) }
}

/// What a Process call streamed back.
#[derive(Default)]
pub struct Processed {
    pub document: Vec<f32>,
    pub chunks: Vec<Vec<f32>>,
    /// Event kinds in arrival order.
    pub kinds: Vec<&'static str>,
    pub log_probs: Vec<f32>,
    /// Hidden-state rows, flattened, in document order.
    pub hidden: Vec<f32>,
    pub done: Option<pb::Done>,
}

/// Runs a Process call to completion.
pub async fn process_call(client: &mut TomeClient<Channel>, req: impl tonic::IntoRequest<pb::ProcessRequest>) -> Result<Processed, tonic::Status> {
    let mut stream = client.process(req).await?.into_inner();
    let mut out = Processed::default();
    let floats = |t: Option<pb::Tensor>| -> Vec<f32> { t.unwrap().data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect() };
    while let Some(ev) = stream.message().await? {
        match ev.event.unwrap() {
            pb::process_event::Event::Accepted(_) => out.kinds.push("accepted"),
            pb::process_event::Event::Progress(_) => out.kinds.push("progress"),
            pb::process_event::Event::Chunk(c) => {
                out.kinds.push("chunk");
                assert_eq!(c.index as usize, out.chunks.len(), "chunks arrive in document order");
                out.chunks.push(floats(c.embedding));
            }
            pb::process_event::Event::Document(d) => {
                out.kinds.push("document");
                out.document = floats(d.embedding);
            }
            pb::process_event::Event::HiddenStates(h) => {
                out.kinds.push("hidden");
                let states = h.states.unwrap();
                let width = *states.shape.last().unwrap() as usize;
                assert_eq!(h.token_start as usize * width, out.hidden.len(), "hidden states arrive in order");
                out.hidden.extend(floats(Some(states)));
            }
            pb::process_event::Event::LogProbs(l) => {
                out.kinds.push("log_probs");
                assert_eq!(l.token_start as usize, out.log_probs.len(), "log-probs arrive in order");
                out.log_probs.extend(floats(l.values));
            }
            pb::process_event::Event::Done(d) => {
                out.kinds.push("done");
                out.done = Some(d);
            }
        }
    }
    Ok(out)
}

/// Runs a Process call to completion: (document embedding, chunk embeddings, event kinds in order).
pub async fn process(client: &mut TomeClient<Channel>, req: pb::ProcessRequest) -> Result<(Vec<f32>, Vec<Vec<f32>>, Vec<&'static str>), tonic::Status> {
    let p = process_call(client, req).await?;
    Ok((p.document, p.chunks, p.kinds))
}

/// Prose to repeat into documents of any length.
pub const TEXT: &str = "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of \
    foolishness, it was the epoch of belief, it was the incredulity of season of Light, it was the season of Darkness. ";

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
}

pub fn read_npy(path: &Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec().unwrap()
}

/// `reflection_services!(NAME, VERSION)`: an async fn NAME listing the services a server names
/// through that version of reflection (grpcurl speaks v1, grpcio-reflection v1alpha).
macro_rules! reflection_services {
    ($name:ident, $version:ident) => {
        pub async fn $name(addr: &str) -> Vec<String> {
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::ServerReflectionRequest;

            let channel = Channel::from_shared(addr.to_string()).unwrap().connect().await.unwrap();
            let mut client = ServerReflectionClient::new(channel);
            let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
            let mut responses = client.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
            let resp = responses.message().await.unwrap().unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("no service list") };
            list.service.into_iter().map(|s| s.name).collect()
        }
    };
}

reflection_services!(reflection_services, v1);
reflection_services!(reflection_services_v1alpha, v1alpha);

/// A plain HTTP GET (the metrics endpoint speaks HTTP/1).
pub fn http_get(addr: &str, path: &str) -> String {
    try_http_get(addr, path).unwrap()
}

/// A plain HTTP GET, or the I/O error that ended it (a TLS listener hangs up on one).
pub fn try_http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Throwaway PEM files, removed when dropped: the cluster CA and certificates it signed (for
/// localhost and 127.0.0.1, usable as server and as client: `coordinator`, `worker`, `client`,
/// `etcd`), and a stranger CA with a certificate of its own (`stranger`).
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("tome-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (ca, leaves) in [("ca", &["coordinator", "worker", "client", "etcd"][..]), ("stranger-ca", &["stranger"][..])] {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, ca);
            let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
            std::fs::write(dir.join(format!("{ca}.pem")), issuer.pem()).unwrap();
            for leaf in leaves {
                let key = rcgen::KeyPair::generate().unwrap();
                let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
                params.distinguished_name.push(rcgen::DnType::CommonName, *leaf);
                params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
                let cert = params.signed_by(&key, &issuer).unwrap();
                std::fs::write(dir.join(format!("{leaf}.pem")), cert.pem()).unwrap();
                std::fs::write(dir.join(format!("{leaf}.key")), key.serialize_pem()).unwrap();
            }
        }
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(file)).unwrap()
    }

    /// A client that trusts `ca` and presents `identity`'s certificate, if any.
    pub fn client(&self, ca: &str, identity: Option<&str>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(self.read(&format!("{ca}.pem"))));
        if let Some(who) = identity {
            tls = tls.identity(Identity::from_pem(self.read(&format!("{who}.pem")), self.read(&format!("{who}.key"))));
        }
        tls
    }

    /// The server flags of `who`, taking calls only from holders of a cluster certificate.
    pub fn server_flags(&self, who: &str) -> Vec<String> {
        ["--tls-cert", &self.path(&format!("{who}.pem")), "--tls-key", &self.path(&format!("{who}.key")), "--tls-client-ca", &self.path("ca.pem")].map(String::from).to_vec()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
