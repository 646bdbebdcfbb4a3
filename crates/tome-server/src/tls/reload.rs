//! TLS that follows its files: certificates and keys mounted from Kubernetes Secrets change in
//! place when they are rotated, and a server or client picks the new ones up without a restart.
//!
//! - [`ServerTls`]: a server's rustls configuration (identity, and the client CA for mutual
//!   TLS), behind a lock that a watcher swaps when the files change; [`ServerTls::incoming`]
//!   accepts connections with whatever configuration is current, so new connections use the
//!   new certificate while established ones go on.
//! - [`follow_client`]: a client's configuration as a `watch` channel, updated the same way.
//!
//! A watcher thread hashes the files every [`RELOAD_CHECK`]; files that changed but cannot be
//! used (half-written, a key that does not match) are logged and the previous configuration is
//! kept. The watcher ends when the last user of the configuration is dropped.

use std::path::PathBuf;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use super::{client_config, err, read_certificates, read_private_key, source_chain, ClientTlsFiles, ServerTlsFiles, TlsError, HANDSHAKE_TIMEOUT};

/// How often the files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Connections whose handshake is done, waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;

/// The SHA-256 of the files' contents, in order (an unreadable file hashes as empty).
fn fingerprint(paths: &[&PathBuf]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for p in paths {
        let bytes = std::fs::read(p).unwrap_or_default();
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
    }
    hash.finalize().into()
}

/// Calls `rebuild` whenever the files' contents change, while `in_use` says the configuration
/// still has users (and `rebuild` does not return false).
fn watch_files(paths: Vec<PathBuf>, what: &'static str, in_use: impl Fn() -> bool + Send + 'static, mut rebuild: impl FnMut() -> Result<bool, TlsError> + Send + 'static) {
    let spawned = std::thread::Builder::new().name("tome-tls-reload".into()).spawn(move || {
        let paths_ref: Vec<&PathBuf> = paths.iter().collect();
        let mut seen = fingerprint(&paths_ref);
        loop {
            std::thread::sleep(RELOAD_CHECK);
            if !in_use() {
                return;
            }
            let now = fingerprint(&paths_ref);
            if now == seen {
                continue;
            }
            seen = now;
            match rebuild() {
                Ok(true) => info!(files = ?paths, "{what}: reloaded TLS files"),
                Ok(false) => return,
                Err(e) => warn!(error = %e, "{what}: the TLS files changed but cannot be used; keeping the previous ones"),
            }
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "{what}: cannot watch the TLS files; changes take a restart");
    }
}

/// What a listener speaks inside TLS (its ALPN protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC: HTTP/2.
    Grpc,
    /// Plain HTTP/1.1 (the metrics endpoint).
    Http1,
    /// gRPC and HTTP/1.1 on one port (the coordinator's gRPC and JSON routes).
    GrpcAndHttp1,
}

impl Protocol {
    fn alpn(self) -> Vec<Vec<u8>> {
        match self {
            Protocol::Grpc => vec![b"h2".to_vec()],
            Protocol::Http1 => vec![b"http/1.1".to_vec()],
            Protocol::GrpcAndHttp1 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        }
    }
}

/// The rustls configuration of a server with `files`, or `None` without a certificate.
fn build_server(files: &ServerTlsFiles, protocol: Protocol) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    let (cert, key) = match (&files.cert, &files.key) {
        (None, None) => {
            if files.client_ca.is_some() {
                return Err(err("--tls-client-ca needs --tls-cert and --tls-key: a server checks its callers' certificates only over TLS"));
            }
            return Ok(None);
        }
        (Some(_), None) => return Err(err("--tls-cert needs --tls-key (the certificate's private key)")),
        (None, Some(_)) => return Err(err("--tls-key needs --tls-cert (the key's certificate)")),
        (Some(c), Some(k)) => (c, k),
    };
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read_certificates(cert, "--tls-cert")?).collect::<Result<_, _>>().map_err(|e| err(format!("--tls-cert {}: {e}", cert.display())))?;
    let private = PrivateKeyDer::from_pem_slice(&read_private_key(key, "--tls-key")?).map_err(|e| err(format!("--tls-key {}: {e}", key.display())))?;
    // ring, as tonic's clients use: it builds with a C compiler alone (aws-lc, which has the
    // post-quantum key exchanges, needs cmake).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().map_err(|e| err(format!("TLS protocol versions: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read_certificates(ca, "--tls-client-ca")?) {
                let c = c.map_err(|e| err(format!("--tls-client-ca {}: {e}", ca.display())))?;
                roots.add(c).map_err(|e| err(format!("--tls-client-ca {}: {e}", ca.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().map_err(|e| err(format!("--tls-client-ca {}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, private).map_err(|e| err(format!("--tls-cert {} with --tls-key {}: {}", cert.display(), key.display(), source_chain(&e))))?;
    config.alpn_protocols = protocol.alpn();
    Ok(Some(Arc::new(config)))
}

/// A server's TLS, following its files.
#[derive(Clone)]
pub struct ServerTls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
    mutual: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The TLS `files` configure, followed from now on, or `None` without `--tls-cert`
    /// (plaintext). Every error names the file or flag at fault.
    pub fn load(files: &ServerTlsFiles, protocol: Protocol) -> Result<Option<ServerTls>, TlsError> {
        let Some(config) = build_server(files, protocol)? else { return Ok(None) };
        let tls = ServerTls { current: Arc::new(RwLock::new(config)), mutual: files.client_ca.is_some() };
        let (weak, files) = (Arc::downgrade(&tls.current), files.clone());
        let paths = [&files.cert, &files.key, &files.client_ca].into_iter().flatten().cloned().collect();
        let users = weak.clone();
        watch_files(paths, "server", move || users.strong_count() > 0, move || swap_server(&weak, &files, protocol));
        Ok(Some(tls))
    }

    /// Whether callers must present a certificate the client CA signed.
    pub fn is_mutual(&self) -> bool {
        self.mutual
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// [`ServerTls::incoming`] as a listener `axum::serve` takes.
    pub fn listener(&self, listener: TcpListener) -> TlsListener {
        let local = listener.local_addr();
        TlsListener { accepted: self.incoming(listener), local }
    }

    /// The connections `listener` accepts, each after its TLS handshake with the configuration
    /// current when it arrived. Handshakes run side by side, each within
    /// [`HANDSHAKE_TIMEOUT`]; one that fails is logged at debug level and dropped. Accepting
    /// stops when the stream is dropped.
    pub fn incoming(&self, listener: TcpListener) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors and the like: wait rather than spin.
                            warn!(error = %e, "accepting a connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (tls.acceptor(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// A listener whose connections have done their TLS handshake ([`ServerTls::incoming`]), for
/// `axum::serve`.
pub struct TlsListener {
    accepted: ReceiverStream<std::io::Result<TlsStream<TcpStream>>>,
    local: std::io::Result<std::net::SocketAddr>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.accepted.next().await {
                Some(Ok(stream)) => {
                    let Ok(peer) = stream.get_ref().0.peer_addr() else { continue };
                    return (stream, peer);
                }
                Some(Err(e)) => tracing::debug!(error = %e, "a metrics connection failed"),
                // The accept loop ends only with the process.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.local.as_ref().map(|a| *a).map_err(|e| std::io::Error::new(e.kind(), e.to_string()))
    }
}

fn swap_server(current: &Weak<RwLock<Arc<ServerConfig>>>, files: &ServerTlsFiles, protocol: Protocol) -> Result<bool, TlsError> {
    let Some(current) = current.upgrade() else { return Ok(false) };
    let Some(config) = build_server(files, protocol)? else { return Err(err("the certificate is gone")) };
    *current.write().unwrap_or_else(|p| p.into_inner()) = config;
    Ok(true)
}

/// The client TLS `files` configure, followed from now on (a `watch` channel whose value is
/// the current configuration), or `None` without `--tls-ca` (plaintext).
pub fn follow_client(files: &ClientTlsFiles) -> Result<Option<super::ClientTls>, TlsError> {
    let Some(config) = client_config(files)? else { return Ok(None) };
    let (tx, rx) = watch::channel(config);
    let tx = Arc::new(tx);
    let files = files.clone();
    let paths = [&files.ca, &files.cert, &files.key].into_iter().flatten().cloned().collect();
    let users = tx.clone();
    watch_files(
        paths,
        "client",
        move || !users.is_closed(),
        move || {
            let Some(config) = client_config(&files)? else { return Err(err("the CA is gone")) };
            Ok(tx.send(config).is_ok())
        },
    );
    Ok(Some(rx))
}
