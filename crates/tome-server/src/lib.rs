//! tome-server: what every tome server process shares, whichever service it runs.
//!
//! - [`heap`]: the process heap's policy (freed activations kept for reuse, handed back to the
//!   kernel when the last job or shard ends), set by the binary and applied by both servers.
//! - [`grpc_timeout`]: a call's deadline as its `grpc-timeout` header states it.
//! - [`status`]: what a status carries beyond its code, written by one server and read by
//!   another or by a client: a refusal for now (`retry-after`), a failure that is a
//!   consequence of another rank's (`tome-peer-failed`).
//! - [`EtcdAccess`]: how every process reaches etcd (workers register, coordinators watch):
//!   endpoints, TLS, credentials, keep-alives.
//! - [`auth`]: API keys on the public API (`authorization: Bearer KEY`), checked by the server
//!   and sent by clients.
//! - [`tls`]: TLS for every listener and client, from the `--tls-*` PEM files, and the rule that
//!   a listener reachable beyond loopback speaks TLS unless told `--insecure-plaintext`.
//!
//! It knows nothing of models, ranks or the tome services: the coordinator and the worker both
//! depend on it, so neither reaches into the other for plumbing.

pub mod auth;
mod deadline;
mod etcd;
pub mod heap;
pub mod status;
pub mod tls;

pub use deadline::grpc_timeout;
pub use etcd::{etcd_options, EtcdAccess, EtcdSettings};
