//! tickmesh-train: the train role. Links libtorch (through tch, via
//! tickmesh-model, which holds the model kinds, training and checkpoints).
//!
//! - [`trainer`]: `TrainerActor`, one job at a time on a blocking thread.
//! - [`pool`]: `TrainerPool`, the node agent: registers with the coordinator
//!   on the mesh, takes assignments, runs trainers, reports progress,
//!   checkpoints and failures, renews the leases of its jobs and registers
//!   again after a coordinator restart.
//! - [`port`]: `TrainerPort`, the pool's actor on the mesh (assignments).
//! - [`lease`]: the leases a node holds; trainers check them before writing.

pub mod lease;
pub mod pool;
pub mod port;
pub mod trainer;
