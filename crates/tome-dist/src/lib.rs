//! tome-dist: ranks, shard layouts, and the sequence-parallel attention operators.
//!
//! A [`Group`] is P ranks that exchange tensor frames point to point and through collectives;
//! [`InProcessGroup`] runs them as threads of one process over bounded channels. A [`ShardPlan`]
//! says which global token positions each rank owns (contiguous or zigzag). The operators in
//! [`ops`] are each attention family's communication plan over a Group: what must cross ranks so
//! that every rank computes exactly what one rank holding the whole sequence would.
//!
//! This crate knows nothing of gRPC, models or checkpoints.

mod device;
mod error;
mod group;
mod in_process;
mod layout;
pub mod ops;

pub use device::{device_frame_bytes, frame_to_device, frame_to_host, DeviceData, DeviceFrame, DeviceTensor};
pub use error::{DistError, Result};
pub use group::{frame_bytes, Frame, Group};
pub use in_process::{run_ranks, InProcessGroup, RankError};
pub use layout::{Layout, ShardPlan};
