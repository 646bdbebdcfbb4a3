//! How tome reaches etcd: its endpoints, TLS (the etcd CA, and a client certificate where etcd
//! asks for one) and credentials (a user whose password is read from a file, as Kubernetes
//! Secrets mount it). Workers register and coordinators watch through the same [`EtcdAccess`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tonic::transport::ClientTlsConfig;

use crate::tls::{client_config, ClientTlsFiles};

/// How tome connects to etcd: HTTP/2 pings find a connection that died silently (a half-open
/// socket would otherwise leave a watch or a keep-alive waiting for ever).
pub fn etcd_options() -> ConnectOptions {
    ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)).with_keep_alive(Duration::from_secs(5), Duration::from_secs(5)).with_keep_alive_while_idle(true)
}

/// The flags that say how to reach etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// The CA that signed etcd's certificate (`--etcd-ca`): TLS to etcd.
    pub ca: Option<PathBuf>,
    /// A client certificate and key for etcd's `--client-cert-auth` (`--etcd-cert`/`--etcd-key`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// An etcd user (`--etcd-user`) and the file holding its password (`--etcd-password-file`).
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// Where and how to reach etcd, checked. `Debug` never shows the password.
#[derive(Clone)]
pub struct EtcdAccess {
    endpoints: Vec<String>,
    tls: Option<ClientTlsConfig>,
    user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAccess").field("endpoints", &self.endpoints).field("tls", &self.tls.is_some()).field("user", &self.user.as_ref().map(|u| &u.0)).finish()
    }
}

impl EtcdAccess {
    /// The access `settings` describe; an error names the flag or file at fault. Endpoints are
    /// `host:port` or carry a scheme that agrees with the TLS setting: `https://` needs
    /// `--etcd-ca`, and with `--etcd-ca` an `http://` endpoint is refused rather than quietly
    /// left in plaintext.
    pub fn new(settings: &EtcdSettings) -> Result<Self, String> {
        if settings.endpoints.is_empty() {
            return Err("--etcd: no endpoint".into());
        }
        let files = ClientTlsFiles { ca: settings.ca.clone(), cert: settings.cert.clone(), key: settings.key.clone() };
        let tls = client_config(&files).map_err(|e| e.0.replace("--tls-", "--etcd-"))?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoints = Vec::with_capacity(settings.endpoints.len());
        for e in &settings.endpoints {
            let host_port = match e.split_once("://") {
                None => e.as_str(),
                Some((s, rest)) if s == scheme => rest,
                Some(("https", _)) => return Err(format!("--etcd {e} asks for TLS: give --etcd-ca, the CA that signed etcd's certificate")),
                Some(("http", _)) => return Err(format!("--etcd {e} is plaintext while --etcd-ca asks for TLS: write it https://")),
                Some((s, _)) => return Err(format!("--etcd {e}: scheme {s} is neither http nor https")),
            };
            endpoints.push(format!("{scheme}://{host_port}"));
        }
        let user = match (&settings.user, &settings.password_file) {
            (None, None) => None,
            (Some(_), None) => return Err("--etcd-user needs --etcd-password-file (the file holding its password)".into()),
            (None, Some(_)) => return Err("--etcd-password-file needs --etcd-user".into()),
            (Some(user), Some(file)) => Some((user.clone(), read_password(file)?)),
        };
        Ok(EtcdAccess { endpoints, tls, user })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client connected to etcd (authenticated, when a user is configured).
    pub async fn connect(&self) -> Result<Client, etcd_client::Error> {
        let mut options = etcd_options();
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        if let Some((user, password)) = &self.user {
            options = options.with_user(user.clone(), password.clone());
        }
        Client::connect(&self.endpoints, Some(options)).await
    }
}

/// The password in `file`: its first line, without the line end.
fn read_password(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("--etcd-password-file {}: cannot read it: {e}", file.display()))?;
    let password = text.lines().next().unwrap_or_default().to_string();
    if password.is_empty() {
        return Err(format!("--etcd-password-file {}: its first line is empty", file.display()));
    }
    Ok(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_the_tls_setting_and_credentials_come_in_pairs() {
        let plain = EtcdAccess::new(&EtcdSettings { endpoints: vec!["127.0.0.1:2379".into(), "http://etcd:2379".into()], ..Default::default() }).unwrap();
        assert_eq!(plain.endpoints(), ["http://127.0.0.1:2379", "http://etcd:2379"]);
        let e = EtcdAccess::new(&EtcdSettings { endpoints: vec!["https://etcd:2379".into()], ..Default::default() }).unwrap_err();
        assert!(e.contains("--etcd-ca"), "{e}");
        let e = EtcdAccess::new(&EtcdSettings { endpoints: vec!["etcd:2379".into()], user: Some("root".into()), ..Default::default() }).unwrap_err();
        assert!(e.contains("--etcd-password-file"), "{e}");
        let e = EtcdAccess::new(&EtcdSettings { endpoints: vec!["etcd:2379".into()], ca: Some("/nonexistent/ca.pem".into()), ..Default::default() }).unwrap_err();
        assert!(e.contains("--etcd-ca") && e.contains("/nonexistent/ca.pem"), "{e}");
        let e = EtcdAccess::new(&EtcdSettings::default()).unwrap_err();
        assert!(e.contains("no endpoint"), "{e}");
    }

    #[test]
    fn the_password_is_the_files_first_line_and_never_shown() {
        let file = std::env::temp_dir().join(format!("tome-etcd-password-{}", std::process::id()));
        std::fs::write(&file, "s3cret-pass\n").unwrap();
        let settings = EtcdSettings { endpoints: vec!["etcd:2379".into()], user: Some("tome".into()), password_file: Some(file.clone()), ..Default::default() };
        let access = EtcdAccess::new(&settings).unwrap();
        assert_eq!(access.user.as_ref().map(|u| u.1.as_str()), Some("s3cret-pass"));
        assert!(!format!("{access:?}").contains("s3cret"), "{access:?}");
        std::fs::write(&file, "\n").unwrap();
        assert!(EtcdAccess::new(&settings).unwrap_err().contains("first line is empty"));
        std::fs::remove_file(&file).ok();
    }
}
