//! tome-coordinator: the public `tome.v1.Tome` API.
//!
//! It validates a request against explicit limits, tokenizes, plans the job (ranks, layout,
//! shard boundaries), admits it (a bounded number of jobs in flight), dispatches it to the
//! ranks, and streams the reassembled outputs back in document order. The embedded default runs
//! the ranks as threads of this process (tome-worker); the gRPC server adds standard health and
//! reflection services.

mod config;
mod error;
mod request;
mod server;
mod service;

pub use config::{CoordinatorConfig, Limits};
pub use error::CoordError;
pub use server::serve;
pub use service::Coordinator;
