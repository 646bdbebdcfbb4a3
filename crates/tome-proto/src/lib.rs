//! The generated types of the `tome.v1` wire contract (proto/tome/v1), and its encoded file
//! descriptor set for gRPC reflection. Only the crates that speak the wire depend on this one.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tome.v1");
}

/// The encoded `FileDescriptorSet` of every tome proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tome_descriptor.bin"));
