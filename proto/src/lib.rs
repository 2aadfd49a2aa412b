//! tickmesh-proto: the gRPC contracts, generated from `tickmesh/v1/*.proto`.
//!
//! - `Coordinator`: what nodes call (register, heartbeat, watch assignments,
//!   report checkpoints, watch model versions, start training).

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("tickmesh.v1");
}

/// The encoded file descriptor set, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tickmesh_descriptor");
