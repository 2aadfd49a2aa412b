//! `PredictorActor`: one per (ticker, interval), a child of the predictor
//! registry. Receives `Load` with the version the coordinator names
//! champion, loads it in its own task off the request path, and sends the
//! outcome back to itself as `Loaded`:
//!
//! 1. read `meta.json` and `model.safetensors` and check the checkpoint's
//!    digest (sha256 of both) against the one registered;
//! 2. build the model and load the weights strictly;
//! 3. warm it: one forward pass on the stored history, whose output must
//!    be finite;
//! 4. swap it into the [`ModelHandle`] that requests read: requests in
//!    flight finish on the version they hold.
//!
//! A checkpoint that fails 1–3 for what it is (digest mismatch, truncated
//! or malformed files, a model that does not fit its meta, a non-finite
//! output) is **refused**: recorded in the handle's status, counted in
//! `tickmesh_model_refusals_total`, and the version served before keeps
//! serving. A load that fails for a passing reason (the store or the
//! database unreachable, the object not there yet) is tried again after
//! `serve.load_retry_ms`, doubling up to `serve.load_retry_max_ms`, and the
//! retry is visible in the status too. The actor holds no model and no
//! lock: a crash loses nothing the registry cannot reload.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;
use tickmesh_core::config::{ModelKind, RetrainConfig, ServeConfig};
use tickmesh_core::types::Interval;
use tickmesh_core::Error;
use tickmesh_io::db::Db;
use tickmesh_io::store::SharedStore;
use tickmesh_model::checkpoint::{self, Meta};
use tickmesh_model::forecast::{ForecastPoint, Forecaster};
use tickmesh_model::metrics::EvalReport;
use tracing::{info, warn};

use crate::handle::{ModelHandle, Refusal, Retry, Served, KEPT_REFUSALS};

/// A model version to load.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRef {
    pub version: i64,
    pub sha256: String,
}

/// What is being served for a (ticker, interval).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelInfo {
    pub ticker: String,
    pub interval: Interval,
    pub version: i64,
    pub kind: ModelKind,
    pub features: Vec<String>,
    pub seq_len: usize,
    pub trained_at: chrono::DateTime<chrono::Utc>,
    /// The last bar of the data the model was trained on.
    pub data_watermark: chrono::DateTime<chrono::Utc>,
    /// On the test split, beside the naive forecast.
    pub metrics: EvalReport,
    pub device: String,
}

/// A forecast answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ForecastResponse {
    pub ticker: String,
    pub interval: Interval,
    pub model: ModelInfo,
    /// The last stored bar the forecast starts after.
    pub last_ts: chrono::DateTime<chrono::Utc>,
    pub last_close: f64,
    pub forecasts: Vec<ForecastPoint>,
}

pub struct PredictorActor;

/// Why a load failed.
#[derive(Debug)]
pub enum LoadError {
    /// The checkpoint is bad: refused, not tried again.
    Refused(String),
    /// Something that may pass: tried again after a backoff.
    Transient(String),
}

/// Messages of [`PredictorActor`].
pub enum PredictorMsg {
    /// Serve this version (the champion): load it in the background.
    Load(VersionRef),
    /// A background load ended.
    Loaded(i64, Result<Box<Served>, LoadError>),
    /// Try the load of this version again (a timer after a passing failure).
    Retry(i64),
    /// Score the served version on the stored bars after its training data
    /// and record its live error (every `[retrain] poll_secs`).
    Watch,
}

impl ractor::Message for PredictorMsg {}

#[derive(Clone)]
pub struct PredictorArgs {
    pub handle: Arc<ModelHandle>,
    pub store: SharedStore,
    pub db: Db,
    pub cfg: ServeConfig,
    pub retrain: RetrainConfig,
    /// This node's name (in the model events it records).
    pub node: String,
}

pub struct PredictorState {
    args: PredictorArgs,
    /// The version the coordinator last named: the only one a finished
    /// load may swap in (a rollback names an older version; a slow load of
    /// a superseded version is dropped).
    wanted: Option<VersionRef>,
    /// The version a background load is reading.
    loading: Option<i64>,
    /// Failed tries of `wanted` in a row.
    attempts: u32,
    /// A `Watch` is running (the next one waits its turn).
    watching: Arc<std::sync::atomic::AtomicBool>,
    /// The newest bar whose live error was recorded, per version.
    recorded: Arc<tokio::sync::Mutex<Option<Recorded>>>,
}

/// The version and newest bar of the last live error recorded.
type Recorded = (i64, chrono::DateTime<chrono::Utc>);

pub fn info_of(meta: &Meta) -> ModelInfo {
    ModelInfo {
        ticker: meta.ticker.clone(),
        interval: meta.interval,
        version: meta.version,
        kind: meta.kind,
        features: meta.features.clone(),
        seq_len: meta.seq_len,
        trained_at: meta.trained_at,
        data_watermark: meta.data.to,
        metrics: meta.metrics,
        device: meta.device.clone(),
    }
}

/// Failpoint: `TICKMESH_FAILPOINT_PREDICTOR_PANIC=TICKER:N` makes the first
/// N `Load` messages of TICKER's predictors in this process panic (the
/// tests' injected crash).
fn failpoint_panic(ticker: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LEFT: AtomicU64 = AtomicU64::new(u64::MAX);
    let Some((t, n)) = std::env::var("TICKMESH_FAILPOINT_PREDICTOR_PANIC")
        .ok()
        .and_then(|v| {
            v.split_once(':')
                .map(|(t, n)| (t.to_string(), n.to_string()))
        })
    else {
        return;
    };
    if t != ticker {
        return;
    }
    let _ = LEFT.compare_exchange(
        u64::MAX,
        n.parse().unwrap_or(0),
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    if LEFT
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| l.checked_sub(1))
        .is_ok()
    {
        panic!("failpoint: an injected panic in the predictor of {ticker}");
    }
}

/// Reads, verifies, builds and warms `v` (steps 1-3 of the module header).
async fn load(a: &PredictorArgs, v: &VersionRef) -> Result<Served, LoadError> {
    let h = &a.handle;
    let (meta, weights) = checkpoint::read(
        a.store.as_ref(),
        &h.ticker,
        h.interval,
        v.version,
        &v.sha256,
    )
    .await
    .map_err(|e| match e {
        Error::Invalid { .. } => LoadError::Refused(e.to_string()),
        e => LoadError::Transient(e.to_string()),
    })?;
    if meta.ticker != h.ticker || meta.interval != h.interval || meta.version != v.version {
        return Err(LoadError::Refused(format!(
            "meta.json names {} {} v{}",
            meta.ticker, meta.interval, meta.version
        )));
    }
    let forecaster = tokio::task::spawn_blocking(move || Forecaster::load(meta, &weights))
        .await
        .map_err(|e| LoadError::Refused(format!("the model load panicked: {e}")))?
        .map_err(|e| LoadError::Refused(e.to_string()))?;
    // Warm: the stored history for this model's shape, and one forward pass.
    let (history, _) = h
        .history(&a.db, &forecaster, Duration::ZERO)
        .await
        .map_err(|e| LoadError::Transient(e.to_string()))?;
    let (forecaster, out) = tokio::task::spawn_blocking(move || {
        let out = (history.keep() <= history.bars() as usize).then(|| forecaster.predict(&history));
        (forecaster, out)
    })
    .await
    .map_err(|e| LoadError::Refused(format!("the warm-up forward pass panicked: {e}")))?;
    match out {
        Some(Ok(z)) if !z.is_finite() => {
            return Err(LoadError::Refused(format!(
                "the model's output on the stored data is {z}"
            )))
        }
        Some(Ok(_)) => {}
        // Too little data, or undefined features at its end: servable once there is.
        None => {
            warn!(ticker = %h.ticker, interval = %h.interval, "too little stored data for a warm-up pass")
        }
        Some(Err(e)) => {
            warn!(ticker = %h.ticker, interval = %h.interval, error = %e, "no warm-up pass")
        }
    }
    let info = info_of(&forecaster.meta);
    Ok(Served { forecaster, info })
}

/// Records a model event of this node in the database (Admin's
/// `ListModelEvents`, the dashboard), in the background; a failure is
/// logged and counted.
fn record_event(a: &PredictorArgs, kind: &'static str, version: i64, detail: String) {
    let e = tickmesh_io::db::ModelEventRow {
        ticker: a.handle.ticker.clone(),
        interval: a.handle.interval,
        version,
        kind: kind.into(),
        node: a.node.clone(),
        detail,
        at: chrono::Utc::now(),
    };
    let db = a.db.clone();
    tokio::spawn(async move {
        if let Err(err) = db.record_model_event(&e).await {
            metrics::counter!("tickmesh_model_event_failures_total").increment(1);
            warn!(ticker = %e.ticker, interval = %e.interval, version, kind, error = %err, "cannot record the model event");
        }
    });
}

/// Scores the served version on the stored bars after its training data
/// (the handle's history refresh does it) and records its live error
/// (`live_errors`, `tickmesh_model_live_rmse*`) when a new bar was scored.
async fn watch_live(
    a: &PredictorArgs,
    served: &Served,
    recorded: &tokio::sync::Mutex<Option<Recorded>>,
) -> tickmesh_core::Result<()> {
    let h = &a.handle;
    h.history(&a.db, &served.forecaster, Duration::ZERO).await?;
    let Some(live) = h.live().await else {
        return Ok(());
    };
    if live.version != served.info.version {
        return Ok(());
    }
    let labels = [
        ("ticker", h.ticker.clone()),
        ("interval", h.interval.to_string()),
    ];
    metrics::gauge!("tickmesh_model_live_rmse", &labels).set(live.rmse);
    let test = served.info.metrics.model.rmse;
    if test > 0.0 {
        metrics::gauge!("tickmesh_model_live_rmse_ratio", &labels).set(live.rmse / test);
    }
    let mut last = recorded.lock().await;
    if *last == Some((live.version, live.through)) {
        return Ok(());
    }
    a.db.record_live_error(&tickmesh_io::db::LiveError {
        ticker: h.ticker.clone(),
        interval: h.interval,
        version: live.version,
        bars: live.bars as i64,
        rmse: live.rmse,
        through: live.through,
    })
    .await?;
    *last = Some((live.version, live.through));
    Ok(())
}

impl PredictorState {
    fn start_load(&mut self, myself: &ActorRef<PredictorMsg>, v: VersionRef) {
        self.loading = Some(v.version);
        self.args
            .handle
            .update_status(|s| s.loading = Some(v.version));
        let a = self.args.clone();
        let me = myself.clone();
        tokio::spawn(async move {
            let outcome = load(&a, &v).await.map(Box::new);
            let _ = me.cast(PredictorMsg::Loaded(v.version, outcome));
        });
    }

    /// Starts loading `wanted` unless it is served or being loaded.
    fn pursue(&mut self, myself: &ActorRef<PredictorMsg>) {
        let Some(v) = self.wanted.clone() else {
            return;
        };
        let serving = self.args.handle.served().map(|s| s.info.version);
        if serving == Some(v.version) || self.loading.is_some() {
            return;
        }
        self.start_load(myself, v);
    }
}

impl Actor for PredictorActor {
    type Msg = PredictorMsg;
    type State = PredictorState;
    type Arguments = PredictorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PredictorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(Duration::from_secs(args.retrain.poll_secs), || {
            PredictorMsg::Watch
        });
        Ok(PredictorState {
            args,
            wanted: None,
            loading: None,
            attempts: 0,
            watching: Default::default(),
            recorded: Default::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let h = st.args.handle.clone();
        match msg {
            PredictorMsg::Load(v) => {
                failpoint_panic(&h.ticker);
                if st.wanted.as_ref() != Some(&v) {
                    st.attempts = 0;
                    h.update_status(|s| s.retry = None);
                }
                st.wanted = Some(v);
                st.pursue(&myself);
            }
            PredictorMsg::Watch => {
                use std::sync::atomic::Ordering;
                let Some(served) = h.served() else {
                    return Ok(());
                };
                if st.watching.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                let (a, watching, recorded) =
                    (st.args.clone(), st.watching.clone(), st.recorded.clone());
                tokio::spawn(async move {
                    if let Err(e) = watch_live(&a, &served, &recorded).await {
                        warn!(ticker = %a.handle.ticker, interval = %a.handle.interval, error = %e,
                            "cannot score the live bars");
                    }
                    watching.store(false, Ordering::Release);
                });
            }
            PredictorMsg::Retry(version) => {
                if st.wanted.as_ref().map(|w| w.version) == Some(version) {
                    st.pursue(&myself);
                }
            }
            PredictorMsg::Loaded(version, outcome) => {
                if st.loading == Some(version) {
                    st.loading = None;
                }
                let wanted = st.wanted.as_ref().map(|w| w.version) == Some(version);
                match outcome {
                    Ok(served) if wanted => {
                        info!(ticker = %h.ticker, interval = %h.interval, version, "model swapped in");
                        record_event(&st.args, "served", version, String::new());
                        metrics::counter!("tickmesh_model_loads_total", "outcome" => "served")
                            .increment(1);
                        h.swap(*served);
                        st.attempts = 0;
                        h.update_status(|s| {
                            s.loading = None;
                            s.retry = None;
                        });
                    }
                    Ok(_) => {}
                    Err(LoadError::Refused(reason)) => {
                        warn!(ticker = %h.ticker, interval = %h.interval, version, %reason,
                            "model version refused; the current version keeps serving");
                        metrics::counter!("tickmesh_model_loads_total", "outcome" => "refused")
                            .increment(1);
                        metrics::counter!("tickmesh_model_refusals_total", "ticker" => h.ticker.clone(), "interval" => h.interval.to_string())
                            .increment(1);
                        h.event("refused", version, None, reason.clone());
                        record_event(&st.args, "refused", version, reason.clone());
                        h.update_status(|s| {
                            s.loading = None;
                            if wanted {
                                s.retry = None;
                            }
                            s.refused.push(Refusal {
                                version,
                                reason,
                                at: chrono::Utc::now(),
                            });
                            let extra = s.refused.len().saturating_sub(KEPT_REFUSALS);
                            s.refused.drain(..extra);
                        });
                        if wanted {
                            // Not tried again until the coordinator names it anew.
                            st.wanted = None;
                            st.attempts = 0;
                        }
                    }
                    Err(LoadError::Transient(error)) if wanted => {
                        st.attempts += 1;
                        let cfg = &st.args.cfg;
                        let wait = cfg
                            .load_retry_ms
                            .saturating_mul(1 << (st.attempts - 1).min(20))
                            .min(cfg.load_retry_max_ms);
                        warn!(ticker = %h.ticker, interval = %h.interval, version, %error, attempts = st.attempts, wait_ms = wait,
                            "model load failed; trying again");
                        metrics::counter!("tickmesh_model_loads_total", "outcome" => "retry")
                            .increment(1);
                        let attempts = st.attempts;
                        h.event("retrying", version, None, error.clone());
                        record_event(&st.args, "retrying", version, error.clone());
                        h.update_status(|s| {
                            s.loading = None;
                            s.retry = Some(Retry {
                                version,
                                attempts,
                                last_error: error,
                                next_at: chrono::Utc::now()
                                    + chrono::Duration::milliseconds(wait as i64),
                            });
                        });
                        myself.send_after(Duration::from_millis(wait), move || {
                            PredictorMsg::Retry(version)
                        });
                    }
                    Err(LoadError::Transient(_)) => {}
                }
                h.update_status(|s| s.loading = st.loading);
                // A newer wanted version may have waited for this load.
                st.pursue(&myself);
            }
        }
        Ok(())
    }
}
