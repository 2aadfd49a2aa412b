//! tickmesh-proto: the gRPC contracts, generated from `tickmesh/v1/*.proto`,
//! and how their calls are authenticated ([`auth`]).
//!
//! - `Coordinator`: what nodes call (register, heartbeat, watch assignments,
//!   report checkpoints, watch model versions, start training). Guarded by
//!   the cluster's cookie.
//! - `Admin`: what operators call (nodes, jobs, models, train, retrain,
//!   promote, rollback, drain, cordon). Guarded by the admin token.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("tickmesh.v1");
}

pub mod auth;

/// The encoded file descriptor set, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tickmesh_descriptor");
