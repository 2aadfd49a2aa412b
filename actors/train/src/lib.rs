//! tickmesh-train: the train role. Links libtorch (through tch, via
//! tickmesh-model, which holds the model kinds, training and checkpoints).
//!
//! - [`trainer`]: `TrainerActor`, one job at a time on a blocking thread.
//! - [`pool`]: `TrainerPool`, the node agent: registers with the coordinator,
//!   takes assignments, runs trainers, reports progress, checkpoints and
//!   failures.

pub mod pool;
pub mod trainer;
