//! tickmesh-coordinator: the coordinator role.
//!
//! - [`coordinator`]: `CoordinatorActor`, the state: nodes, leases, jobs,
//!   the model registry, the watchers to push versions to.
//! - [`grpc`]: the tonic `Coordinator` service (plus health and reflection)
//!   in front of the actor.
//! - [`start_consumer`]: `StartModelConsumer`, bus `start_model` → jobs.

pub mod coordinator;
pub mod grpc;
pub mod start_consumer;
