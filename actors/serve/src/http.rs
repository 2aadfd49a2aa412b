//! The HTTP API (axum):
//! - `GET /ml/forecast?ticker=AAPL&interval=1d&n_steps=10` → forecasts, JSON;
//!   404 with a JSON error for an unknown ticker, 400 for bad parameters,
//!   503 while a model loads.
//! - `POST /ml/train?ticker=AAPL&interval=1d&epochs=30[&model=gru]` → `202
//!   {"job": ID}`: a job queued at the coordinator like any other; 400 for
//!   bad parameters, 404 for a ticker without aggregated data, 503 when the
//!   coordinator cannot be reached.
//! - `GET /ml/train/{id}` → the job's state: `queued`, `running` (with the
//!   last finished epoch and its losses), `done` (with the version and the
//!   test metrics) or `failed` (with the reason); 404 for an unknown id.
//!   Asked of the coordinator's port on the mesh.
//! - `GET /ml/models` → what is served, with metrics beside the naive baseline.
//! - `GET /health` → `ok`; `GET /metrics` → the process's metrics
//!   (`tickmesh_io::telemetry`).

use std::collections::HashMap;
use std::future::Future;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ractor::{call_t, ActorRef};
use serde_json::json;
use tickmesh_core::config::ModelKind;
use tickmesh_core::types::{validate_ticker, Interval};
use tickmesh_io::supervision::Slot;
use tickmesh_proto::auth::Link;
use tickmesh_proto::mesh::{CoordinatorPortMsg, Scope};
use tickmesh_proto::v1::StartTrainingRequest;
use tokio::net::TcpListener;

use crate::registry::RegistryMsg;
use crate::ServeError;

#[derive(Clone)]
pub struct HttpState {
    registry: Slot<RegistryMsg>,
    pub max_steps: usize,
    /// The coordinator's gRPC port, for `Admin.Train` with the caller's token.
    link: Option<Link>,
    /// The cluster's scope on the mesh, for job status from the coordinator's port.
    scope: Scope,
}

impl HttpState {
    pub fn new(registry: Slot<RegistryMsg>, max_steps: usize, scope: Scope) -> Self {
        HttpState {
            registry,
            max_steps,
            link: None,
            scope,
        }
    }

    /// Sends `/ml/train` requests to the coordinator `link` reaches.
    pub fn with_coordinator(mut self, link: &Link) -> Self {
        self.link = Some(link.clone());
        self
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        match self {
            ServeError::NotFound(m) => error(StatusCode::NOT_FOUND, m),
            ServeError::BadRequest(m) => error(StatusCode::BAD_REQUEST, m),
            ServeError::Unavailable(m) => error(StatusCode::SERVICE_UNAVAILABLE, m),
            ServeError::Unauthorized(m) => error(StatusCode::UNAUTHORIZED, m),
        }
    }
}

/// The `ticker` (validated as sent, then upper-cased in ASCII) and
/// `interval` (default `1d`) parameters.
fn ticker_interval(q: &HashMap<String, String>) -> Result<(String, Interval), ServeError> {
    let ticker = q
        .get("ticker")
        .ok_or_else(|| ServeError::BadRequest("missing query parameter `ticker`".into()))?
        .to_ascii_uppercase();
    validate_ticker(&ticker).map_err(|e| ServeError::BadRequest(e.to_string()))?;
    let interval: Interval = q
        .get("interval")
        .map(String::as_str)
        .unwrap_or("1d")
        .parse()
        .map_err(|e: tickmesh_core::Error| ServeError::BadRequest(e.to_string()))?;
    Ok((ticker, interval))
}

fn params(
    q: &HashMap<String, String>,
    max_steps: usize,
) -> Result<(String, Interval, usize), ServeError> {
    let (ticker, interval) = ticker_interval(q)?;
    let n_steps = match q.get("n_steps") {
        None => 10,
        Some(s) => s.parse::<usize>().map_err(|_| {
            ServeError::BadRequest(format!("`n_steps` = `{s}` is not a whole number"))
        })?,
    };
    if n_steps == 0 || n_steps > max_steps {
        return Err(ServeError::BadRequest(format!(
            "`n_steps` must be in 1..={max_steps}"
        )));
    }
    Ok((ticker, interval, n_steps))
}

async fn forecast(
    State(st): State<HttpState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let (ticker, interval, n_steps) = params(&q, st.max_steps)?;
        call_t!(
            registry(&st)?,
            |reply| RegistryMsg::Forecast {
                ticker,
                interval,
                n_steps,
                reply
            },
            60_000
        )
        .map_err(|e| ServeError::Unavailable(format!("predictor registry: {e}")))?
    }
    .await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(ServeError::Unavailable(_)) => "unavailable",
        Err(_) => "client_error",
    };
    metrics::counter!("tickmesh_forecast_requests_total", "outcome" => outcome).increment(1);
    match result {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The parameters of `POST /ml/train`: ticker, interval, epochs (0: the
/// trainers' config) and model kind (`None`: the trainers' config).
fn train_params(
    q: &HashMap<String, String>,
) -> Result<(String, Interval, u32, Option<ModelKind>), ServeError> {
    if let Some(k) = q
        .keys()
        .find(|k| !["ticker", "interval", "epochs", "model"].contains(&k.as_str()))
    {
        return Err(ServeError::BadRequest(format!(
            "unknown query parameter `{k}` (ticker, interval, epochs, model)"
        )));
    }
    let (ticker, interval) = ticker_interval(q)?;
    let epochs = match q.get("epochs") {
        None => 0,
        Some(s) => match s.parse::<u32>() {
            Ok(e) if (1..=10_000).contains(&e) => e,
            _ => {
                return Err(ServeError::BadRequest(format!(
                    "`epochs` = `{s}` must be a whole number in 1..=10000"
                )))
            }
        },
    };
    let model = q
        .get("model")
        .map(|m| m.parse::<ModelKind>())
        .transpose()
        .map_err(|e| ServeError::BadRequest(e.to_string()))?;
    Ok((ticker, interval, epochs, model))
}

/// The predictor registry's current incarnation.
fn registry(st: &HttpState) -> Result<ActorRef<RegistryMsg>, ServeError> {
    st.registry
        .get()
        .ok_or_else(|| ServeError::Unavailable("the predictor registry is starting".into()))
}

fn grpc_error(e: tonic::Status) -> ServeError {
    match e.code() {
        tonic::Code::InvalidArgument => ServeError::BadRequest(e.message().to_string()),
        tonic::Code::NotFound => ServeError::NotFound(e.message().to_string()),
        tonic::Code::Unauthenticated => ServeError::Unauthorized(e.message().to_string()),
        _ => ServeError::Unavailable(format!("coordinator: {}", e.message())),
    }
}

/// `POST /ml/train` queues work, so it takes the Admin API's credential:
/// the caller's `Authorization: Bearer <admin token>` is passed on to
/// `Admin.Train`, and the coordinator checks it (401 without it or when it
/// is wrong).
async fn train(
    State(st): State<HttpState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        let (ticker, interval, epochs, model) = train_params(&q)?;
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ServeError::Unauthorized(
                    "POST /ml/train needs `Authorization: Bearer <admin token>` (TICKMESH_ADMIN_TOKEN)"
                        .into(),
                )
            })?;
        let link = st.link.clone().ok_or_else(|| {
            ServeError::Unavailable("this node has no coordinator to send training jobs to".into())
        })?;
        let reply = link
            .with_secret(Some(token))
            .admin()
            .map_err(|e| ServeError::Unauthorized(format!("the token: {e}")))?
            .train(StartTrainingRequest {
                tickers: vec![ticker],
                interval: interval.to_string(),
                model: model.map(|m| m.to_string()).unwrap_or_default(),
                epochs,
            })
            .await
            .map_err(grpc_error)?
            .into_inner();
        if let Some(r) = reply.refused.first() {
            return Err(if r.contains("unknown ticker") {
                ServeError::NotFound(r.clone())
            } else {
                ServeError::Unavailable(r.clone())
            });
        }
        reply
            .job_ids
            .first()
            .cloned()
            .ok_or_else(|| ServeError::Unavailable("the coordinator queued no job".into()))
    }
    .await;
    match result {
        Ok(job) => (StatusCode::ACCEPTED, Json(json!({ "job": job }))).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn train_status(State(st): State<HttpState>, Path(id): Path<String>) -> Response {
    let result = async {
        if id.is_empty() || id.len() > 128 {
            return Err(ServeError::BadRequest(
                "a job id is 1-128 characters".into(),
            ));
        }
        let what = format!("job {id}");
        let j = st
            .scope
            .ask(
                "job status",
                |reply| CoordinatorPortMsg::GetJob(id.into(), reply),
                std::time::Duration::from_secs(10),
            )
            .await
            .map_err(ServeError::Unavailable)?
            .ok_or_else(|| ServeError::NotFound(format!("unknown {what}")))?;
        let mut body = json!({
            "job": j.job_id,
            "ticker": j.ticker,
            "interval": j.interval,
            "state": j.state,
            "model": if j.model.is_empty() { None } else { Some(&j.model) },
            "node": if j.node.is_empty() { None } else { Some(&j.node) },
        });
        let extra = match j.state.as_str() {
            "running" => json!({
                "epoch": j.train_epoch,
                "epochs": j.epochs,
                "train_loss": (j.train_epoch > 0).then_some(j.train_loss),
                "val_loss": (j.train_epoch > 0).then_some(j.val_loss),
            }),
            "done" => json!({
                "version": j.version,
                "metrics": serde_json::from_str::<serde_json::Value>(&j.metrics_json)
                    .unwrap_or(serde_json::Value::Null),
            }),
            "failed" => json!({ "reason": j.reason }),
            _ => json!({}),
        };
        if let (Some(b), serde_json::Value::Object(e)) = (body.as_object_mut(), extra) {
            b.extend(e);
        }
        Ok(body)
    }
    .await;
    match result {
        Ok(b) => Json(b).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(st): State<HttpState>) -> Response {
    let registry = match registry(&st) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    match call_t!(registry, RegistryMsg::List, 10_000) {
        Ok(list) => Json(json!({ "models": list })).into_response(),
        Err(e) => ServeError::Unavailable(format!("predictor registry: {e}")).into_response(),
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        tickmesh_io::telemetry::render(),
    )
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/ml/forecast", get(forecast))
        .route("/ml/train", post(train))
        .route("/ml/train/{id}", get(train_status))
        .route("/ml/models", get(models))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
}

/// Every node's own endpoints (`nodes.*.metrics_listen`): `GET /metrics`
/// and `GET /healthz`.
pub fn node_router() -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
}

/// Serves [`node_router`] on `listener` until `shutdown` completes.
pub async fn serve_node(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, node_router())
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
