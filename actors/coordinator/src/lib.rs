//! tickmesh-coordinator: the coordinator role.
//!
//! - [`coordinator`]: `CoordinatorActor`, the state: nodes, leases, jobs,
//!   the model registry; membership from the mesh's process groups.
//! - [`port`]: `CoordinatorPort`, the actor nodes talk to on the mesh.
//! - [`grpc`]: the server of the gRPC port (guard, TLS, health, reflection).
//! - [`admin`]: the tonic `tickmesh.v1.Admin` service for operators.
//! - [`gate`]: the promotion gate (a trained version becomes champion only
//!   when it beats naive and the champion on its test window).
//! - [`start_consumer`]: `StartModelConsumer`, bus `start_model` → jobs.

pub mod admin;
pub mod coordinator;
pub mod gate;
pub mod grpc;
pub mod port;
pub mod start_consumer;
