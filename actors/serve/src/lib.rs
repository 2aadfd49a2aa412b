//! tickmesh-serve: the serve role. Links libtorch (through tch, via
//! tickmesh-model); depends on neither the train nor the aggregate role.
//!
//! - [`predictor`]: `PredictorActor`, one per (ticker, interval): loads a
//!   verified checkpoint off the request path and swaps it in atomically.
//! - [`registry`]: `PredictorSupervisor`, routes requests to predictors and
//!   spawns them as model versions arrive.
//! - [`http`]: the axum API (`/ml/forecast`, `/ml/train`, `/ml/models`,
//!   `/health`, `/metrics`).
//! - [`port`]: `PredictorPort`, the registry's actor on the mesh (model
//!   versions from the coordinator).

pub mod http;
pub mod port;
pub mod predictor;
pub mod registry;

use serde::Serialize;

/// Why a request could not be answered; maps to an HTTP status in [`http`].
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthorized(String),
}
