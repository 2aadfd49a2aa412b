//! tickmesh-serve: the serve role. Links libtorch (through tch, via
//! tickmesh-model) to load checkpoints; forecasts run the model's native
//! forward pass. Depends on neither the train nor the aggregate role.
//!
//! - [`handle`]: `ModelHandle`, what a request reads for one (ticker,
//!   interval): the served version (swapped atomically), the cached stored
//!   history, shared computations, and the node's limits.
//! - [`predictor`]: `PredictorActor`, one per (ticker, interval): loads,
//!   verifies and warms a version off the request path, retries passing
//!   failures, refuses bad checkpoints.
//! - [`registry`]: `PredictorSupervisor`, spawns and restarts predictors
//!   as model versions arrive.
//! - [`http`]: the axum API (`/ml/forecast`, `/ml/train`, `/ml/models`,
//!   rollback, `/openapi.json`, `/healthz`, `/readyz`, `/metrics`).
//! - [`port`]: `PredictorPort`, the registry's actor on the mesh (model
//!   versions from the coordinator).

pub mod handle;
pub mod http;
pub mod port;
pub mod predictor;
pub mod registry;

use serde::Serialize;

/// Why a request could not be answered; maps to an HTTP status in [`http`].
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
pub enum ServeError {
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("{0}")]
    Unauthorized(String),
    /// 429 with `Retry-After`: too many requests for one model.
    #[error("{message}")]
    TooMany { message: String, retry_after: u64 },
    /// 503 with `Retry-After`: the node is at its limits.
    #[error("{message}")]
    Overloaded { message: String, retry_after: u64 },
    /// 503 with `Retry-After`: no version is loaded yet (or every one was refused).
    #[error("{message}")]
    Loading { message: String, retry_after: u64 },
    /// 503: a service this request needs (database, coordinator) failed.
    #[error("{0}")]
    Unavailable(String),
    /// 500: a bug (a panic in a forecast); the next request is served.
    #[error("{0}")]
    Internal(String),
}
