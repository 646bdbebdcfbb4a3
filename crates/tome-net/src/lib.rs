//! tome-net: what crosses process boundaries.
//!
//! - [`codec`]: candle tensors to and from `tome.v1.Tensor` (shape, element type, little-endian
//!   bytes), for every tensor the services stream and every frame between ranks.
//! - [`PeerHub`] / [`PeerGroup`]: the Group trait over `tome.v1.Peer` gRPC streams, for the
//!   ranks of a job spread over worker processes (the one service this crate implements).
//! - [`traceparent`]: W3C trace context carried coordinator -> worker -> peer.
//! - `nccl` (cargo feature): the Group trait over NCCL, for ranks on GPUs.

mod codec;
mod credential;
mod hub;
#[cfg(feature = "nccl")]
pub mod nccl;
mod peer_group;
pub mod traceparent;

pub use codec::{frame_from_wire, frame_to_wire, tensor_from_wire, tensor_to_wire, CodecError};
pub use credential::{JobSecret, SECRET_BYTES};
pub use hub::{check_job_id, PeerHub, PeerLimits, PeerService, MAX_JOB_ID_BYTES, PEER_KEEPALIVE};
pub use peer_group::PeerGroup;
pub use traceparent::TraceParent;
