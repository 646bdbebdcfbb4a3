//! How tome connects to etcd.

use std::time::Duration;

use etcd_client::ConnectOptions;

/// How tome connects to etcd: HTTP/2 pings find a connection that died silently (a half-open
/// socket would otherwise leave a watch or a keep-alive waiting for ever).
pub fn etcd_options() -> ConnectOptions {
    ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)).with_keep_alive(Duration::from_secs(5), Duration::from_secs(5)).with_keep_alive_while_idle(true)
}
