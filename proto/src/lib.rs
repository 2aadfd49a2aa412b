//! tickmesh-proto: the contracts between tickmesh processes.
//!
//! - [`mesh`]: the node protocol. Nodes talk to the coordinator as actors on
//!   the ractor_cluster mesh (register, heartbeat, assignments, progress,
//!   checkpoint and failure reports, model updates), with messages encoded
//!   by bincode 2 under a size limit. Guarded by the cluster's cookie.
//! - `v1::Admin` (gRPC, generated from `tickmesh/v1/admin.proto`): what
//!   operators and external clients call (nodes, jobs, models, train,
//!   retrain, promote, rollback, drain, cordon). Guarded by the admin token.
//! - [`auth`]: bearer credentials and TLS for both.

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("tickmesh.v1");
}

pub mod auth;
pub mod mesh;

/// The encoded file descriptor set, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tickmesh_descriptor");
