//! TLS for every tome listener and every tome client, from PEM files named by flags.
//!
//! - A server's identity is `--tls-cert`/`--tls-key`; with `--tls-client-ca` its callers must
//!   present a certificate that CA signed (mutual TLS: how workers take calls only from
//!   cluster members).
//! - A client trusts the server certificates `--tls-ca` signed and, for mutual TLS, presents
//!   `--tls-cert`/`--tls-key`. Addresses stay `host:port`; [`endpoint`] makes them `https` when
//!   TLS is configured.
//! - [`check_listen`]: a listener reachable beyond loopback speaks TLS, or the operator says
//!   `--insecure-plaintext` and the server says so loudly.
//!
//! - [`ServerTls`] and [`follow_client`] (module `reload`): configurations that follow their
//!   files, so rotated certificates take effect without a restart.
//!
//! Every error names the file (or flag) it is about. The crypto is rustls with ring.

mod reload;

pub use reload::{follow_client, Protocol, ServerTls, TlsListener, RELOAD_CHECK};

/// A client's TLS configuration as it follows its files: read the current one with `borrow()`.
pub type ClientTls = tokio::sync::watch::Receiver<ClientTlsConfig>;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// How long a server waits for a connection's TLS handshake: a caller that opens a connection
/// and says nothing does not hold it longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS setting that cannot be used, with what is wrong and which file or flag it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

fn err(message: impl Into<String>) -> TlsError {
    TlsError(message.into())
}

/// A server's TLS files: its identity and, for mutual TLS, the CA its callers' certificates
/// must chain to.
#[derive(Clone, Debug, Default)]
pub struct ServerTlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
}

/// A client's TLS files: the CA the server's certificate must chain to and, for mutual TLS,
/// the identity it presents.
#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Reads a PEM file holding at least one certificate; returns the file's bytes.
pub fn read_certificates(path: &Path, flag: &str) -> Result<Vec<u8>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| err(format!("{flag} {}: cannot read it: {e}", path.display())))?;
    let mut n = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| err(format!("{flag} {}: not PEM certificates: {e}", path.display())))?;
        n += 1;
    }
    if n == 0 {
        return Err(err(format!("{flag} {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)", path.display())));
    }
    Ok(pem)
}

/// Reads a PEM file holding a private key (PKCS#8, PKCS#1 or SEC1); returns the file's bytes.
pub fn read_private_key(path: &Path, flag: &str) -> Result<Vec<u8>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| err(format!("{flag} {}: cannot read it: {e}", path.display())))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => err(format!("{flag} {}: holds no PEM private key (-----BEGIN PRIVATE KEY-----)", path.display())),
        e => err(format!("{flag} {}: not a PEM private key: {e}", path.display())),
    })?;
    Ok(pem)
}

/// The identity in `cert` and `key` (both or neither).
fn identity(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Identity>, TlsError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(err("--tls-cert needs --tls-key (the certificate's private key)")),
        (None, Some(_)) => Err(err("--tls-key needs --tls-cert (the key's certificate)")),
        (Some(c), Some(k)) => Ok(Some(Identity::from_pem(read_certificates(c, "--tls-cert")?, read_private_key(k, "--tls-key")?))),
    }
}

/// The server TLS `files` configure, followed from now on, or `None` without `--tls-cert`
/// (plaintext). A key that does not match its certificate is an error here, at start-up.
pub fn server_config(files: &ServerTlsFiles, protocol: Protocol) -> Result<Option<ServerTls>, TlsError> {
    ServerTls::load(files, protocol)
}

/// The client TLS `files` configure, or `None` without `--tls-ca` (plaintext).
pub fn client_config(files: &ClientTlsFiles) -> Result<Option<ClientTlsConfig>, TlsError> {
    let identity = identity(files.cert.as_deref(), files.key.as_deref())?;
    let Some(ca) = &files.ca else {
        if identity.is_some() {
            return Err(err("a client certificate (--tls-cert) is presented over TLS only: give --tls-ca, the CA that signed the server's certificate"));
        }
        return Ok(None);
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_certificates(ca, "--tls-ca")?)).timeout(HANDSHAKE_TIMEOUT);
    if let Some(identity) = identity {
        config = config.identity(identity);
    }
    // Build it once here, so a bad identity is an error at start-up, not at the first call.
    endpoint("localhost:1", Some(&config)).map_err(|e| err(format!("--tls-ca {} / --tls-cert {}: {e}", ca.display(), show(&files.cert))))?;
    Ok(Some(config))
}

fn show(path: &Option<PathBuf>) -> String {
    path.as_ref().map_or_else(|| "(none)".into(), |p| p.display().to_string())
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// An endpoint for `address` (`host:port`; an `http://` or `https://` prefix is accepted and
/// replaced): `https` with `tls`, else `http`. An `https://` address without TLS configured is
/// refused rather than quietly sent in plaintext.
pub fn endpoint(address: &str, tls: Option<&ClientTlsConfig>) -> Result<Endpoint, TlsError> {
    let (host_port, asked_tls) = match address.split_once("://") {
        None => (address, false),
        Some(("http", rest)) => (rest, false),
        Some(("https", rest)) => (rest, true),
        Some((scheme, _)) => return Err(err(format!("address {address}: scheme {scheme} is neither http nor https (give host:port)"))),
    };
    match tls {
        None if asked_tls => Err(err(format!("address {address} asks for TLS: give --tls-ca, the CA that signed its certificate"))),
        None => Endpoint::from_shared(format!("http://{host_port}")).map_err(|e| err(format!("address {address}: {}", source_chain(&e)))),
        Some(tls) => {
            Endpoint::from_shared(format!("https://{host_port}")).and_then(|e| e.tls_config(tls.clone())).map_err(|e| err(format!("address {address}: {}", source_chain(&e))))
        }
    }
}

/// How a server's listener is exposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposure {
    /// TLS, wherever it listens.
    Tls,
    /// Plaintext on a loopback address: only this machine can call.
    LoopbackPlaintext,
    /// Plaintext beyond loopback, because the operator said `--insecure-plaintext`: the caller
    /// logs a warning.
    InsecurePlaintext,
}

/// Whether a server may listen on `listen` as configured: beyond loopback it speaks TLS, or the
/// operator has said `--insecure-plaintext`.
pub fn check_listen(listen: SocketAddr, tls: bool, insecure_plaintext: bool) -> Result<Exposure, TlsError> {
    if tls {
        return Ok(Exposure::Tls);
    }
    if is_loopback(listen) {
        return Ok(Exposure::LoopbackPlaintext);
    }
    if insecure_plaintext {
        return Ok(Exposure::InsecurePlaintext);
    }
    Err(err(format!(
        "refusing to listen on {listen} in plaintext: it is reachable beyond this machine, so anyone on the network could call it. \
         Give --tls-cert and --tls-key (and --tls-client-ca for mutual TLS), listen on 127.0.0.1, \
         or say --insecure-plaintext to serve plaintext anyway"
    )))
}

/// 127.0.0.0/8, ::1, and IPv4 loopback written as an IPv6-mapped address.
pub fn is_loopback(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of throwaway PEM files: a CA, a certificate for localhost that it signed, and
    /// a key of another certificate.
    struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        fn new(name: &str) -> Pki {
            let dir = std::env::temp_dir().join(format!("tome-tls-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
            let other = rcgen::KeyPair::generate().unwrap();
            for (file, text) in
                [("ca.pem", ca.pem()), ("cert.pem", cert.pem()), ("key.pem", key.serialize_pem()), ("other-key.pem", other.serialize_pem()), ("junk.pem", "hello\n".into())]
            {
                std::fs::write(dir.join(file), text).unwrap();
            }
            Pki { dir }
        }

        fn path(&self, file: &str) -> Option<PathBuf> {
            Some(self.dir.join(file))
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn beyond_loopback_a_listener_speaks_tls_or_is_explicitly_plaintext() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        for loopback in ["127.0.0.1:50051", "127.8.9.10:0", "[::1]:7", "[::ffff:127.0.0.1]:7"] {
            assert_eq!(check_listen(at(loopback), false, false), Ok(Exposure::LoopbackPlaintext), "{loopback}");
        }
        for open in ["0.0.0.0:50051", "[::]:50051", "10.1.2.3:1", "[::ffff:10.0.0.1]:7"] {
            let refused = check_listen(at(open), false, false).unwrap_err();
            assert!(refused.0.contains(open.trim_start_matches('[').split(']').next().unwrap()) && refused.0.contains("--insecure-plaintext"), "{refused}");
            assert_eq!(check_listen(at(open), false, true), Ok(Exposure::InsecurePlaintext));
            assert_eq!(check_listen(at(open), true, false), Ok(Exposure::Tls));
        }
    }

    #[test]
    fn a_server_needs_its_certificate_and_key_together() {
        let pki = Pki::new("server");
        assert!(server_config(&ServerTlsFiles::default(), Protocol::Grpc).unwrap().is_none(), "no flags: plaintext");
        let files = ServerTlsFiles { cert: pki.path("cert.pem"), key: pki.path("key.pem"), client_ca: pki.path("ca.pem") };
        assert!(server_config(&files, Protocol::Grpc).unwrap().is_some());
        assert!(server_config(&ServerTlsFiles { client_ca: None, ..files.clone() }, Protocol::Grpc).unwrap().is_some());
        let e = server_config(&ServerTlsFiles { key: None, ..files.clone() }, Protocol::Grpc).unwrap_err();
        assert!(e.0.contains("--tls-cert needs --tls-key"), "{e}");
        let e = server_config(&ServerTlsFiles { cert: None, key: None, ..files.clone() }, Protocol::Grpc).unwrap_err();
        assert!(e.0.contains("--tls-client-ca needs --tls-cert"), "{e}");
    }

    #[test]
    fn a_bad_file_is_named_in_the_error() {
        let pki = Pki::new("files");
        let good = ServerTlsFiles { cert: pki.path("cert.pem"), key: pki.path("key.pem"), client_ca: pki.path("ca.pem") };
        let cases = [
            (ServerTlsFiles { cert: pki.path("missing.pem"), ..good.clone() }, "--tls-cert", "missing.pem"),
            (ServerTlsFiles { cert: pki.path("junk.pem"), ..good.clone() }, "--tls-cert", "junk.pem"),
            (ServerTlsFiles { cert: pki.path("key.pem"), ..good.clone() }, "--tls-cert", "key.pem"),
            (ServerTlsFiles { key: pki.path("junk.pem"), ..good.clone() }, "--tls-key", "junk.pem"),
            (ServerTlsFiles { key: pki.path("cert.pem"), ..good.clone() }, "--tls-key", "cert.pem"),
            (ServerTlsFiles { client_ca: pki.path("junk.pem"), ..good.clone() }, "--tls-client-ca", "junk.pem"),
            // A key that is not the certificate's.
            (ServerTlsFiles { key: pki.path("other-key.pem"), ..good.clone() }, "--tls-key", "other-key.pem"),
        ];
        for (files, flag, file) in cases {
            let e = server_config(&files, Protocol::Grpc).unwrap_err();
            assert!(e.0.contains(flag) && e.0.contains(file), "{flag} {file}: {e}");
        }
        let e = client_config(&ClientTlsFiles { ca: pki.path("junk.pem"), cert: None, key: None }).unwrap_err();
        assert!(e.0.contains("--tls-ca") && e.0.contains("junk.pem"), "{e}");
    }

    #[test]
    fn a_client_presents_a_certificate_only_over_tls() {
        let pki = Pki::new("client");
        assert!(client_config(&ClientTlsFiles::default()).unwrap().is_none(), "no flags: plaintext");
        assert!(client_config(&ClientTlsFiles { ca: pki.path("ca.pem"), cert: None, key: None }).unwrap().is_some());
        assert!(client_config(&ClientTlsFiles { ca: pki.path("ca.pem"), cert: pki.path("cert.pem"), key: pki.path("key.pem") }).unwrap().is_some());
        let e = client_config(&ClientTlsFiles { ca: None, cert: pki.path("cert.pem"), key: pki.path("key.pem") }).unwrap_err();
        assert!(e.0.contains("--tls-ca"), "{e}");
    }

    #[test]
    fn addresses_are_host_port_and_the_scheme_follows_the_tls_setting() {
        let pki = Pki::new("endpoint");
        let tls = client_config(&ClientTlsFiles { ca: pki.path("ca.pem"), cert: None, key: None }).unwrap().unwrap();
        let uri = |a: &str, tls: Option<&ClientTlsConfig>| endpoint(a, tls).map(|e| e.uri().to_string());
        assert_eq!(uri("127.0.0.1:5", None).unwrap(), "http://127.0.0.1:5/");
        assert_eq!(uri("http://127.0.0.1:5", None).unwrap(), "http://127.0.0.1:5/");
        assert_eq!(uri("127.0.0.1:5", Some(&tls)).unwrap(), "https://127.0.0.1:5/");
        assert_eq!(uri("http://localhost:5", Some(&tls)).unwrap(), "https://localhost:5/");
        assert_eq!(uri("https://localhost:5", Some(&tls)).unwrap(), "https://localhost:5/");
        assert!(uri("https://localhost:5", None).unwrap_err().0.contains("--tls-ca"));
        assert!(uri("ftp://localhost:5", None).is_err());
    }
}
