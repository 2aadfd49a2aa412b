//! tickmesh-coordinator: the coordinator role.
//!
//! - [`coordinator`]: `CoordinatorActor`, the state: nodes, leases, jobs,
//!   the model registry, the watchers to push versions to.
//! - [`grpc`]: the tonic `Coordinator` service in front of the actor, and
//!   the server of the gRPC port (guards, TLS, health, reflection).
//! - [`admin`]: the tonic `tickmesh.v1.Admin` service for operators.
//! - [`start_consumer`]: `StartModelConsumer`, bus `start_model` → jobs.

pub mod admin;
pub mod coordinator;
pub mod grpc;
pub mod start_consumer;
