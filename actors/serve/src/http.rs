//! The HTTP API (axum):
//! - `GET /ml/forecast?ticker=AAPL&interval=1d&n_steps=10` → forecasts, JSON;
//!   404 with a JSON error for an unknown ticker, 400 for bad parameters,
//!   503 while a model loads.
//! - `GET /ml/models` → what is served, with metrics beside the naive baseline.
//! - `GET /health` → `ok`; `GET /metrics` → Prometheus counters.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use ractor::{call_t, ActorRef};
use serde_json::json;
use tickmesh_core::types::{validate_ticker, Interval};
use tokio::net::TcpListener;

use crate::registry::RegistryMsg;
use crate::ServeError;

#[derive(Clone)]
pub struct HttpState {
    pub registry: ActorRef<RegistryMsg>,
    pub max_steps: usize,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    client_errors: AtomicU64,
    unavailable: AtomicU64,
}

impl HttpState {
    pub fn new(registry: ActorRef<RegistryMsg>, max_steps: usize) -> Self {
        HttpState {
            registry,
            max_steps,
            counters: Arc::default(),
        }
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
        }
    }
}

fn params(
    q: &HashMap<String, String>,
    max_steps: usize,
) -> Result<(String, Interval, usize), ServeError> {
    let ticker = q
        .get("ticker")
        .ok_or_else(|| ServeError::BadRequest("missing query parameter `ticker`".into()))?
        .to_uppercase();
    validate_ticker(&ticker).map_err(|e| ServeError::BadRequest(e.to_string()))?;
    let interval: Interval = q
        .get("interval")
        .map(String::as_str)
        .unwrap_or("1d")
        .parse()
        .map_err(|e: tickmesh_core::Error| ServeError::BadRequest(e.to_string()))?;
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
            st.registry,
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
    let c = &st.counters;
    match result {
        Ok(r) => {
            c.ok.fetch_add(1, Ordering::Relaxed);
            Json(r).into_response()
        }
        Err(e) => {
            match e {
                ServeError::Unavailable(_) => c.unavailable.fetch_add(1, Ordering::Relaxed),
                _ => c.client_errors.fetch_add(1, Ordering::Relaxed),
            };
            e.into_response()
        }
    }
}

async fn models(State(st): State<HttpState>) -> Response {
    match call_t!(st.registry, RegistryMsg::List, 10_000) {
        Ok(list) => Json(json!({ "models": list })).into_response(),
        Err(e) => ServeError::Unavailable(format!("predictor registry: {e}")).into_response(),
    }
}

async fn metrics(State(st): State<HttpState>) -> String {
    let c = &st.counters;
    format!(
        "tickmesh_forecast_requests_total{{outcome=\"ok\"}} {}\ntickmesh_forecast_requests_total{{outcome=\"client_error\"}} {}\ntickmesh_forecast_requests_total{{outcome=\"unavailable\"}} {}\n",
        c.ok.load(Ordering::Relaxed),
        c.client_errors.load(Ordering::Relaxed),
        c.unavailable.load(Ordering::Relaxed)
    )
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/ml/forecast", get(forecast))
        .route("/ml/models", get(models))
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .with_state(state)
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
