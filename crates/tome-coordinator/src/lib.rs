//! tome-coordinator: the public `tome.v1.Tome` API.
//!
//! It validates a request against explicit limits, tokenizes, plans the job (ranks, layout,
//! shard boundaries), admits it (a bounded number of jobs in flight, the rest waiting in a bounded queue, callers in
//! turn), dispatches it to the
//! ranks, and streams the reassembled outputs back in document order. The embedded default runs
//! the ranks as threads of this process (tome-worker); a [`Cluster`] runs them on worker
//! processes found through a [`Membership`] (a static list or etcd). The gRPC server adds
//! standard health and reflection services.

mod cluster;
mod config;
mod error;
pub mod http;
pub mod membership;
pub mod metrics;
mod queue;
mod request;
mod server;
mod service;

pub use cluster::{Cluster, DEFAULT_JOB_ATTEMPTS};
pub use config::{CoordinatorConfig, Limits};
pub use error::CoordError;
pub use membership::{EtcdMembership, Membership, StaticMembership};
pub use queue::QueueLimits;
pub use server::serve;
pub use service::Coordinator;
