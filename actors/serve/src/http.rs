//! The HTTP API (axum); `GET /openapi.json` describes it
//! (`actors/serve/openapi.json`):
//! - `GET /ml/forecast?ticker=AAPL&interval=1d&n_steps=10` → forecasts with
//!   the model's version, kind, trained_at and data watermark; 404 with a
//!   JSON error for an unknown ticker, 400 for bad parameters, 429 / 503
//!   with `Retry-After` past the limits or while no version is loaded
//!   ([`crate::handle`]).
//! - `POST /ml/train?ticker=AAPL&interval=1d&epochs=30[&model=gru]` → `202
//!   {"job": ID}`: a job queued at the coordinator like any other; 400 for
//!   bad parameters, 404 for a ticker without aggregated data, 503 when the
//!   coordinator cannot be reached.
//! - `GET /ml/train/{id}` → the job's state: `queued`, `running` (with the
//!   last finished epoch and its losses), `done` (with the version and the
//!   test metrics) or `failed` (with the reason); 404 for an unknown id.
//!   Asked of the coordinator's port on the mesh.
//! - `GET /ml/models` → every predictor of the node: what it serves (with
//!   metrics beside the naive baseline), what it loads, retries or refused.
//! - `GET /ml/models/{ticker}` → per interval, the predictor's state and
//!   every registered version (status, metrics, lineage: data range and
//!   training job).
//! - `POST /ml/models/{ticker}/{interval}/rollback` → `Admin.Rollback` with
//!   the caller's token: the previous champion is put back.
//! - `POST /ml/models/{ticker}/{interval}/promote?version=N` →
//!   `Admin.Promote` with the caller's token.
//! - `GET /ml/history?ticker&interval&n` → the last `n` stored closes.
//! - `GET /ml/cluster` → the nodes on the mesh (with their operator state)
//!   and the newest jobs.
//! - `GET /events` → server-sent events: each version served, refused or
//!   retried on this node.
//! - `GET /ml/events?ticker&limit` → the model events of the whole cluster
//!   (`model_events`: the gate's promotions and rejections, operators'
//!   promotions and rollbacks, every serve node's served, refused and
//!   retried versions), newest first.
//! - `GET /` → the dashboard (`assets/dashboard.html`, its script and
//!   style, and the vendored uPlot under `/assets/`).
//! - `GET /healthz` → `ok`; `GET /readyz` → 200 once the node's roles run and
//!   no model is in its first load, else 503 saying what it waits for;
//!   `GET /metrics` → Prometheus text (`tickmesh_io::telemetry`).
//!   (`GET /health` stays as the original's alias of `/healthz`.)

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tickmesh_core::config::ModelKind;
use tickmesh_core::types::{validate_ticker, Interval};
use tickmesh_io::db::Db;
use tickmesh_proto::auth::Link;
use tickmesh_proto::mesh::{CoordinatorPortMsg, Scope};
use tickmesh_proto::v1::{PromoteRequest, RollbackRequest, StartTrainingRequest};
use tokio::net::TcpListener;

use crate::handle::{Limits, ModelHandle, Table};
use crate::ServeError;

/// Whether the node's roles have started (set by the node once its root
/// supervisor runs them; `/readyz` answers 503 before).
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
pub struct HttpState {
    table: Table,
    limits: Arc<Limits>,
    db: Db,
    /// The coordinator's gRPC port, for `Admin.Train` / `Admin.Rollback`
    /// with the caller's token.
    link: Option<Link>,
    /// The cluster's scope on the mesh, for job status from the coordinator's port.
    scope: Scope,
    ready: Readiness,
}

impl HttpState {
    pub fn new(table: Table, limits: Arc<Limits>, db: Db, scope: Scope, ready: Readiness) -> Self {
        HttpState {
            table,
            limits,
            db,
            link: None,
            scope,
            ready,
        }
    }

    /// Sends `/ml/train` and rollback requests to the coordinator `link` reaches.
    pub fn with_coordinator(mut self, link: &Link) -> Self {
        self.link = Some(link.clone());
        self
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn retry_after(mut r: Response, secs: u64) -> Response {
    r.headers_mut()
        .insert("retry-after", HeaderValue::from(secs.max(1)));
    r
}

impl IntoResponse for ServeError {
    fn into_response(self) -> Response {
        match self {
            ServeError::NotFound(m) => error(StatusCode::NOT_FOUND, m),
            ServeError::BadRequest(m) => error(StatusCode::BAD_REQUEST, m),
            ServeError::Unauthorized(m) => error(StatusCode::UNAUTHORIZED, m),
            ServeError::TooMany {
                message,
                retry_after: s,
            } => retry_after(error(StatusCode::TOO_MANY_REQUESTS, message), s),
            ServeError::Overloaded {
                message,
                retry_after: s,
            }
            | ServeError::Loading {
                message,
                retry_after: s,
            } => retry_after(error(StatusCode::SERVICE_UNAVAILABLE, message), s),
            ServeError::Unavailable(m) => retry_after(error(StatusCode::SERVICE_UNAVAILABLE, m), 1),
            ServeError::Internal(m) => error(StatusCode::INTERNAL_SERVER_ERROR, m),
        }
    }
}

/// At most 40 characters of a value a client sent, for an error message
/// (an error never echoes a whole oversized input).
fn quoted(v: &str) -> String {
    const MAX: usize = 40;
    match v.char_indices().nth(MAX) {
        Some((i, _)) => format!("`{}…` ({} bytes)", &v[..i], v.len()),
        None => format!("`{v}`"),
    }
}

/// The `ticker` (validated as sent: ASCII letters, digits, `.` and `-`;
/// then upper-cased) and `interval` (default `1d`) parameters.
fn ticker_interval(q: &HashMap<String, String>) -> Result<(String, Interval), ServeError> {
    let raw = q
        .get("ticker")
        .ok_or_else(|| ServeError::BadRequest("missing query parameter `ticker`".into()))?;
    let ticker = parse_ticker(raw)?;
    let interval = match q.get("interval") {
        None => Interval::D1,
        Some(i) => i.parse().map_err(|_| {
            ServeError::BadRequest(format!(
                "`interval` = {} is not one of 1m, 5m, 15m, 30m, 1h, 1d",
                quoted(i)
            ))
        })?,
    };
    Ok((ticker, interval))
}

/// A ticker as a client sent it: checked before it is upper-cased, so no
/// Unicode case folding can turn another string into a ticker.
fn parse_ticker(raw: &str) -> Result<String, ServeError> {
    let ok = !raw.is_empty()
        && raw.len() <= 12
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let ticker = raw.to_ascii_uppercase();
    if !ok || validate_ticker(&ticker).is_err() {
        return Err(ServeError::BadRequest(format!(
            "`ticker` = {} must be 1-12 characters of A-Z 0-9 . - starting with a letter",
            quoted(raw)
        )));
    }
    Ok(ticker)
}

/// Refuses a query parameter not in `known`, naming them.
fn only_params(q: &HashMap<String, String>, known: &[&str]) -> Result<(), ServeError> {
    match q.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ServeError::BadRequest(format!(
            "unknown query parameter {} ({})",
            quoted(k),
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// Query parameter `name` as a whole number in `1..=max`, `default` when absent.
fn bounded(
    q: &HashMap<String, String>,
    name: &str,
    default: i64,
    max: i64,
) -> Result<i64, ServeError> {
    match q.get(name) {
        None => Ok(default),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ServeError::BadRequest(format!(
                "`{name}` = {} must be a whole number in 1..={max}",
                quoted(s)
            ))),
        },
    }
}

fn params(
    q: &HashMap<String, String>,
    max_steps: usize,
) -> Result<(String, Interval, usize), ServeError> {
    only_params(q, &["ticker", "interval", "n_steps"])?;
    let (ticker, interval) = ticker_interval(q)?;
    let n_steps = match q.get("n_steps") {
        None => 10,
        Some(s) => s.parse::<usize>().map_err(|_| {
            ServeError::BadRequest(format!("`n_steps` = {} is not a whole number", quoted(s)))
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
    let started = Instant::now();
    let result = async {
        let (ticker, interval, n_steps) = params(&q, st.limits.cfg.max_steps)?;
        let handle = st.table.get(&ticker, interval).ok_or_else(|| {
            ServeError::NotFound(format!(
                "unknown ticker {ticker} for interval {interval}: no model has been trained for it"
            ))
        })?;
        handle.forecast(&st.db, &st.limits, n_steps).await
    }
    .await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(ServeError::TooMany { .. }) => "too_many",
        Err(ServeError::Overloaded { .. }) => "overloaded",
        Err(ServeError::Loading { .. } | ServeError::Unavailable(_)) => "unavailable",
        Err(ServeError::Internal(_)) => "internal",
        Err(_) => "client_error",
    };
    metrics::counter!("tickmesh_forecast_requests_total", "outcome" => outcome).increment(1);
    metrics::histogram!("tickmesh_forecast_request_seconds", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
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
    only_params(q, &["ticker", "interval", "epochs", "model"])?;
    let (ticker, interval) = ticker_interval(q)?;
    let epochs = bounded(q, "epochs", 0, 10_000)? as u32;
    let model = q
        .get("model")
        .map(|m| {
            m.parse::<ModelKind>().map_err(|_| {
                ServeError::BadRequest(format!(
                    "`model` = {} is not one of {}",
                    quoted(m),
                    ModelKind::ALL.map(|k| k.as_str()).join(", ")
                ))
            })
        })
        .transpose()?;
    Ok((ticker, interval, epochs, model))
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
        let token = bearer(&headers, "POST /ml/train")?;
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

/// One predictor for `/ml/models`: what it serves (the model's fields, as
/// the original listed them; absent while nothing is served), and its
/// `state`, `loading`, `retry`, `refused` and `restarts`.
async fn describe(h: &ModelHandle) -> serde_json::Value {
    let served = h.served();
    let st = h.status();
    let state = if served.is_some() {
        "serving"
    } else if st.retry.is_some() {
        "retrying"
    } else if st.loading.is_some() {
        "loading"
    } else if !st.refused.is_empty() {
        "refused"
    } else {
        "idle"
    };
    let mut entry = match served.as_ref().map(|s| serde_json::to_value(&s.info)) {
        Some(Ok(serde_json::Value::Object(m))) => m,
        _ => serde_json::Map::new(),
    };
    entry.insert("ticker".into(), json!(h.ticker));
    entry.insert("interval".into(), json!(h.interval));
    for (k, v) in [
        ("state", json!(state)),
        ("loading", json!(st.loading)),
        ("retry", json!(st.retry)),
        ("refused", json!(st.refused)),
        ("restarts", json!(st.restarts)),
        ("live", json!(h.live().await)),
    ] {
        entry.insert(k.into(), v);
    }
    serde_json::Value::Object(entry)
}

async fn models(State(st): State<HttpState>) -> Response {
    let mut list = Vec::new();
    for h in st.table.all() {
        list.push(describe(&h).await);
    }
    Json(json!({ "models": list })).into_response()
}

/// `GET /ml/models/{ticker}`: per interval, the predictor and every
/// registered version with its metrics and lineage.
async fn model_detail(State(st): State<HttpState>, Path(raw): Path<String>) -> Response {
    let result = async {
        let ticker = parse_ticker(&raw)?;
        let unavailable = |e: tickmesh_core::Error| ServeError::Unavailable(e.to_string());
        let versions = st
            .db
            .models(Some(&ticker), None, true)
            .await
            .map_err(unavailable)?;
        let jobs = st
            .db
            .recent_jobs(&["done".to_string()], Some(&ticker), 10_000)
            .await
            .map_err(unavailable)?;
        let job_of: HashMap<(Interval, i64), &str> = jobs
            .iter()
            .map(|j| ((j.interval, j.version), j.id.as_str()))
            .collect();
        let mut by_interval: BTreeMap<Interval, Vec<serde_json::Value>> = BTreeMap::new();
        for v in &versions {
            let metrics: serde_json::Value =
                serde_json::from_str(&v.metrics).unwrap_or(serde_json::Value::Null);
            by_interval.entry(v.interval).or_default().push(json!({
                "version": v.version,
                "kind": v.kind,
                "status": v.status,
                "created_at": v.created_at,
                "sha256": v.sha256,
                "uri": v.uri,
                "metrics": metrics,
                "job": job_of.get(&(v.interval, v.version)),
            }));
        }
        let mut intervals: Vec<serde_json::Value> = Vec::new();
        let served: Vec<Arc<ModelHandle>> = st
            .table
            .all()
            .into_iter()
            .filter(|h| h.ticker == ticker)
            .collect();
        let mut keys: Vec<Interval> = by_interval.keys().copied().collect();
        keys.extend(served.iter().map(|h| h.interval));
        keys.sort();
        keys.dedup();
        for i in keys {
            let predictor = match served.iter().find(|h| h.interval == i) {
                Some(h) => Some(describe(h).await),
                None => None,
            };
            let mut versions = by_interval.remove(&i).unwrap_or_default();
            versions.reverse();
            intervals.push(json!({
                "interval": i,
                "predictor": predictor,
                "versions": versions,
            }));
        }
        if intervals.is_empty() {
            return Err(ServeError::NotFound(format!(
                "no model has been registered for {ticker}"
            )));
        }
        Ok(json!({ "ticker": ticker, "intervals": intervals }))
    }
    .await;
    match result {
        Ok(b) => Json(b).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The caller's `Authorization: Bearer <token>`.
fn bearer<'a>(headers: &'a axum::http::HeaderMap, what: &str) -> Result<&'a str, ServeError> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ServeError::Unauthorized(format!(
                "{what} needs `Authorization: Bearer <admin token>` (TICKMESH_ADMIN_TOKEN)"
            ))
        })
}

/// `POST /ml/models/{ticker}/{interval}/rollback`: `Admin.Rollback` with
/// the caller's token; the predictors swap when the coordinator pushes
/// the champion it put back.
async fn rollback(
    State(st): State<HttpState>,
    headers: axum::http::HeaderMap,
    Path((raw, interval)): Path<(String, String)>,
) -> Response {
    change_champion(&st, &headers, &raw, &interval, None).await
}

/// `POST /ml/models/{ticker}/{interval}/promote?version=N`: `Admin.Promote`
/// with the caller's token.
async fn promote(
    State(st): State<HttpState>,
    headers: axum::http::HeaderMap,
    Path((raw, interval)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let version = q
        .get("version")
        .ok_or_else(|| ServeError::BadRequest("missing query parameter `version`".into()))
        .and_then(|v| {
            v.parse::<i64>().map_err(|_| {
                ServeError::BadRequest(format!("`version` = {} is not a whole number", quoted(v)))
            })
        });
    match version {
        Ok(v) => change_champion(&st, &headers, &raw, &interval, Some(v)).await,
        Err(e) => e.into_response(),
    }
}

/// A rollback (`version` None) or a promotion of `version`, sent to the
/// coordinator with the caller's token; answers the new champion.
async fn change_champion(
    st: &HttpState,
    headers: &axum::http::HeaderMap,
    raw: &str,
    interval: &str,
    version: Option<i64>,
) -> Response {
    let what = if version.is_some() {
        "a promotion"
    } else {
        "a rollback"
    };
    let result = async {
        let ticker = parse_ticker(raw)?;
        let interval: Interval = interval.parse().map_err(|_| {
            ServeError::BadRequest(format!(
                "interval {} is not one of 1m, 5m, 15m, 30m, 1h, 1d",
                quoted(interval)
            ))
        })?;
        let token = bearer(headers, what)?;
        let link = st.link.clone().ok_or_else(|| {
            ServeError::Unavailable(format!("this node has no coordinator to send {what} to"))
        })?;
        let mut admin = link
            .with_secret(Some(token))
            .admin()
            .map_err(|e| ServeError::Unauthorized(format!("the token: {e}")))?;
        let interval = interval.to_string();
        let m = match version {
            None => admin.rollback(RollbackRequest { ticker, interval }).await,
            Some(version) => {
                admin
                    .promote(PromoteRequest {
                        ticker,
                        interval,
                        version,
                    })
                    .await
            }
        }
        .map_err(grpc_error)?
        .into_inner();
        Ok::<_, ServeError>(json!({
            "ticker": m.ticker,
            "interval": m.interval,
            "version": m.version,
            "kind": m.kind,
            "status": m.status,
        }))
    }
    .await;
    match result {
        Ok(b) => Json(b).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /ml/history?ticker&interval&n`: the last `n` (default 200, at most
/// 5,000) stored closes, oldest first.
async fn history(
    State(st): State<HttpState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        only_params(&q, &["ticker", "interval", "n"])?;
        let (ticker, interval) = ticker_interval(&q)?;
        let n = bounded(&q, "n", 200, 5_000)?;
        let closes = st
            .db
            .recent_closes(&ticker, interval, n)
            .await
            .map_err(|e| ServeError::Unavailable(e.to_string()))?;
        if closes.is_empty() {
            return Err(ServeError::NotFound(format!(
                "no data for {ticker} {interval}"
            )));
        }
        Ok(json!({
            "ticker": ticker,
            "interval": interval,
            "closes": closes.iter().map(|(ts, c)| json!({"ts": ts, "close": c})).collect::<Vec<_>>(),
        }))
    }
    .await;
    match result {
        Ok(b) => Json(b).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /ml/cluster`: the nodes on the mesh (trainer pools and predictor
/// registries, by their ports' names, the coordinator if it is reachable),
/// each with its operator state (cordoned, draining), and the newest 20 jobs.
async fn cluster(State(st): State<HttpState>) -> Response {
    let result = async {
        let unavailable = |e: tickmesh_core::Error| ServeError::Unavailable(e.to_string());
        let admin: HashMap<String, String> = st
            .db
            .node_states()
            .await
            .map_err(unavailable)?
            .into_iter()
            .collect();
        let mut nodes: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (group, role, port) in [
            (tickmesh_proto::mesh::TRAINERS, "train", "trainer"),
            (tickmesh_proto::mesh::PREDICTORS, "serve", "predictor"),
        ] {
            let prefix = format!("tickmesh.{}.{port}.", st.scope.name());
            for cell in st.scope.members(group) {
                if let Some(node) = cell
                    .get_name()
                    .and_then(|n| n.strip_prefix(&prefix).map(str::to_string))
                {
                    nodes.entry(node).or_default().push(role);
                }
            }
        }
        let jobs = st
            .db
            .recent_jobs(&[], None, 20)
            .await
            .map_err(unavailable)?;
        Ok::<_, ServeError>(json!({
            "coordinator": st.scope.coordinator().is_ok(),
            "nodes": nodes.iter().map(|(n, roles)| json!({
                "node": n,
                "roles": roles,
                "state": admin.get(n).map_or("ready", String::as_str),
            })).collect::<Vec<_>>(),
            "jobs": jobs.iter().map(|j| json!({
                "job": j.id,
                "ticker": j.ticker,
                "interval": j.interval,
                "state": j.state,
                "node": j.node,
                "version": j.version,
                "attempts": j.attempts,
                "updated_at": j.updated_at,
            })).collect::<Vec<_>>(),
        }))
    }
    .await;
    match result {
        Ok(b) => Json(b).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /ml/events?ticker&limit`: the newest model events (default 50, at
/// most 1,000).
async fn model_events(
    State(st): State<HttpState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let result = async {
        only_params(&q, &["ticker", "limit"])?;
        let ticker = q.get("ticker").map(|t| parse_ticker(t)).transpose()?;
        let limit = bounded(&q, "limit", 50, 1_000)?;
        let events = st
            .db
            .model_events(ticker.as_deref(), None, limit)
            .await
            .map_err(|e| ServeError::Unavailable(e.to_string()))?;
        Ok::<_, ServeError>(json!({ "events": events }))
    }
    .await;
    match result {
        Ok(b) => Json(b).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /events`: server-sent events, one `model` event (JSON, a
/// [`crate::handle::ModelEvent`]) per version served, refused or retried;
/// a listener that falls behind skips what it missed.
async fn events(
    State(st): State<HttpState>,
) -> axum::response::sse::Sse<
    impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use tokio::sync::broadcast::error::RecvError;
    let rx = st.table.events();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let ev = axum::response::sse::Event::default()
                        .event("model")
                        .json_data(&e)
                        .unwrap_or_else(|_| {
                            axum::response::sse::Event::default().comment("unencodable")
                        });
                    return Some((Ok(ev), rx));
                }
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    });
    axum::response::sse::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default())
}

/// The dashboard and its assets, compiled in.
const DASHBOARD_HTML: &str = include_str!("../assets/dashboard.html");
const ASSETS: [(&str, &str, &str); 4] = [
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_str!("../assets/dashboard.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../assets/vendor/uPlot.min.css"),
    ),
];

async fn dashboard() -> impl IntoResponse {
    (
        [("content-type", "text/html; charset=utf-8")],
        DASHBOARD_HTML,
    )
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, body)) => ([("content-type", *mime)], *body).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no asset {}", quoted(&name))),
    }
}

/// `/readyz` of a serve node: the node's roles run, and no model waits for
/// its first version.
async fn ready(State(st): State<HttpState>) -> Response {
    if !st.ready.is_set() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the node is starting");
    }
    let waiting: Vec<String> = st
        .table
        .all()
        .iter()
        .filter(|h| {
            let s = h.status();
            h.served().is_none() && (s.loading.is_some() || s.retry.is_some())
        })
        .map(|h| format!("{} {}", h.ticker, h.interval))
        .collect();
    if waiting.is_empty() {
        "ready".into_response()
    } else {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("loading the first version of {}", waiting.join(", ")),
        )
    }
}

/// The OpenAPI 3.1 document of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");

async fn openapi() -> impl IntoResponse {
    ([("content-type", "application/json")], OPENAPI)
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
        .route("/ml/models/{ticker}", get(model_detail))
        .route("/ml/models/{ticker}/{interval}/rollback", post(rollback))
        .route("/ml/models/{ticker}/{interval}/promote", post(promote))
        .route("/ml/history", get(history))
        .route("/ml/cluster", get(cluster))
        .route("/events", get(events))
        .route("/ml/events", get(model_events))
        .route("/", get(dashboard))
        .route("/assets/{name}", get(asset))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/health", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(state)
}

/// Every node's own endpoints (`nodes.*.metrics_listen`): `GET /metrics`,
/// `GET /healthz` and `GET /readyz` (200 once the node's roles run).
pub fn node_router(ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.is_set() {
                        "ready".into_response()
                    } else {
                        error(StatusCode::SERVICE_UNAVAILABLE, "the node is starting")
                    }
                }
            }),
        )
}

/// Serves [`node_router`] on `listener` until `shutdown` completes.
pub async fn serve_node(
    listener: TcpListener,
    ready: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, node_router(ready))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `/openapi.json` documents exactly the routes [`router`] serves.
    #[test]
    fn the_openapi_document_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                assert!(
                    op["responses"].is_object(),
                    "{method} {path} has no responses"
                );
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        documented.sort();
        // The routes as this file declares them.
        let src = include_str!("http.rs");
        let router_src =
            &src[src.find("pub fn router(").unwrap()..src.find("pub fn node_router(").unwrap()];
        let mut served: Vec<(String, String)> = router_src
            .lines()
            .filter_map(|l| {
                let l = l.trim().strip_prefix(".route(\"")?;
                let (path, rest) = l.split_once('"')?;
                let method = rest.trim_start_matches(", ").split('(').next()?;
                Some((method.to_uppercase(), path.to_string()))
            })
            .collect();
        served.sort();
        assert_eq!(documented, served);
    }

    #[test]
    fn tickers_are_checked_before_they_are_upper_cased() {
        assert_eq!(parse_ticker("aapl").unwrap(), "AAPL");
        assert_eq!(parse_ticker("brk.b").unwrap(), "BRK.B");
        // U+017F LATIN SMALL LETTER LONG S upper-cases to S in Unicode.
        for bad in ["ſyna", "", "1ABC", "TOOLONGTICKER", "A B", "Ä"] {
            let e = parse_ticker(bad).unwrap_err().to_string();
            assert!(e.contains("must be 1-12 characters"), "{bad}: {e}");
        }
        let e = parse_ticker(&"x".repeat(10_000)).unwrap_err().to_string();
        assert!(e.len() < 150, "{e}");
        assert!(e.contains("(10000 bytes)"), "{e}");
    }
}
