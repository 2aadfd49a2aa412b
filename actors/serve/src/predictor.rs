//! `PredictorActor`: one per (ticker, interval). Receives `Load` with a new
//! model version and `Forecast` requests. A load runs in its own task (read
//! the checkpoint, verify its sha256, build the model) and comes back as
//! `Swap`, so requests keep being answered by the current version until the
//! new one is ready; a checkpoint that fails verification is refused and the
//! current version keeps serving. Forecasts run on blocking threads, from a
//! history kept per predictor: the stored `aggregated_data` rows folded into
//! the indicator state, brought up to date with the rows stored since the
//! last request (see `tickmesh_model::forecast`).

use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use tickmesh_core::config::ModelKind;
use tickmesh_core::types::Interval;
use tickmesh_io::db::Db;
use tickmesh_io::store::SharedStore;
use tickmesh_model::checkpoint::{self, Meta};
use tickmesh_model::forecast::{ForecastPoint, Forecaster, History};
use tickmesh_model::metrics::EvalReport;
use tracing::{info, warn};

use crate::registry::RegistryMsg;
use crate::ServeError;

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
    pub last_ts: chrono::DateTime<chrono::Utc>,
    pub last_close: f64,
    pub forecasts: Vec<ForecastPoint>,
}

pub struct PredictorActor;

/// Messages of [`PredictorActor`].
pub enum PredictorMsg {
    /// Load this version in the background.
    Load(VersionRef),
    /// A background load finished: serve this model from now on.
    Swap(Box<Forecaster>),
    /// A background load of this version failed (a later `Load` tries again).
    LoadFailed(i64),
    /// Forecast `n_steps` after the latest data.
    Forecast {
        n_steps: usize,
        reply: RpcReplyPort<Result<ForecastResponse, ServeError>>,
    },
}

impl ractor::Message for PredictorMsg {}

#[derive(Clone)]
pub struct PredictorArgs {
    pub ticker: String,
    pub interval: Interval,
    pub store: SharedStore,
    pub db: Db,
    pub device: tch::Device,
    pub registry: ActorRef<RegistryMsg>,
}

/// The stored rows folded so far (for the served model's `seq_len`).
type HistoryCache = Arc<tokio::sync::Mutex<Option<History>>>;

/// Brings a cached history up to date with `aggregated_data`: the rows from
/// the cached last bar on are read again; when that bar was rewritten (a
/// re-aggregation revised it) or the row count says earlier rows changed,
/// the history is rebuilt from every stored row.
async fn refresh(
    a: &PredictorArgs,
    cache: &mut Option<History>,
    empty: History,
) -> tickmesh_core::Result<()> {
    let columns = empty.columns();
    if let Some(h) = cache.as_mut().filter(|h| h.same_shape(&empty)) {
        if let (Some((t, _)), Some(kept)) = (h.last(), h.last_row().map(<[_]>::to_vec)) {
            let rows =
                a.db.read_aggregated(
                    &a.ticker,
                    a.interval,
                    &columns,
                    Some(t - chrono::Duration::microseconds(1)),
                )
                .await?;
            let same_last = rows
                .first()
                .is_some_and(|r| r.ts == t && r.values.as_slice() == kept.as_slice());
            let stored = a.db.count_aggregated(&a.ticker, a.interval).await?;
            if same_last && stored as u64 == h.bars() + rows.len() as u64 - 1 {
                for r in &rows[1..] {
                    h.push_stored(r)?;
                }
                return Ok(());
            }
        }
    }
    let rows =
        a.db.read_aggregated(&a.ticker, a.interval, &columns, None)
            .await?;
    let mut h = empty;
    for r in &rows {
        h.push_stored(r)?;
    }
    *cache = Some(h);
    Ok(())
}

pub struct PredictorState {
    args: PredictorArgs,
    current: Option<(Arc<Mutex<Forecaster>>, ModelInfo)>,
    /// The version the coordinator last named champion: the only one a
    /// finished load may swap in (a rollback names an older version; a slow
    /// load of a superseded version is dropped).
    wanted: Option<i64>,
    /// The version a background load is reading (a second `Load` of it waits for it).
    loading: Option<i64>,
    history: HistoryCache,
}

fn info_of(meta: &Meta) -> ModelInfo {
    ModelInfo {
        ticker: meta.ticker.clone(),
        interval: meta.interval,
        version: meta.version,
        kind: meta.kind,
        features: meta.features.clone(),
        seq_len: meta.seq_len,
        trained_at: meta.trained_at,
        metrics: meta.metrics,
        device: meta.device.clone(),
    }
}

impl Actor for PredictorActor {
    type Msg = PredictorMsg;
    type State = PredictorState;
    type Arguments = PredictorArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: PredictorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(PredictorState {
            args,
            current: None,
            wanted: None,
            loading: None,
            history: HistoryCache::default(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PredictorMsg::Load(v) => {
                let serving = st.current.as_ref().map(|(_, i)| i.version);
                st.wanted = Some(v.version);
                if serving == Some(v.version) || st.loading == Some(v.version) {
                    return Ok(());
                }
                st.loading = Some(v.version);
                let a = st.args.clone();
                tokio::spawn(async move {
                    let loaded = async {
                        let (meta, weights) = checkpoint::read(
                            a.store.as_ref(),
                            &a.ticker,
                            a.interval,
                            v.version,
                            &v.sha256,
                        )
                        .await?;
                        let device = a.device;
                        tokio::task::spawn_blocking(move || {
                            Forecaster::load(meta, &weights, device)
                        })
                        .await
                        .map_err(|e| {
                            tickmesh_core::Error::invalid(
                                "checkpoint",
                                format!("model load panicked: {e}"),
                            )
                        })?
                    }
                    .await;
                    match loaded {
                        Ok(f) => {
                            let _ = myself.cast(PredictorMsg::Swap(Box::new(f)));
                        }
                        Err(e) => {
                            warn!(ticker = %a.ticker, interval = %a.interval, version = v.version, error = %e,
                            "model version refused; the current version keeps serving");
                            let _ = myself.cast(PredictorMsg::LoadFailed(v.version));
                        }
                    }
                });
            }
            PredictorMsg::LoadFailed(v) => {
                if st.loading == Some(v) {
                    st.loading = None;
                }
            }
            PredictorMsg::Swap(f) => {
                let info = info_of(&f.meta);
                if st.loading == Some(info.version) {
                    st.loading = None;
                }
                if st.wanted != Some(info.version) {
                    return Ok(());
                }
                info!(ticker = %info.ticker, interval = %info.interval, version = info.version, "model swapped in");
                st.args
                    .registry
                    .cast(RegistryMsg::Serving(Box::new(info.clone())))?;
                st.current = Some((Arc::new(Mutex::new(*f)), info));
            }
            PredictorMsg::Forecast { n_steps, reply } => {
                let Some((model, info)) = st.current.clone() else {
                    let _ = reply.send(Err(ServeError::Unavailable(format!(
                        "the model for {} {} is still loading",
                        st.args.ticker, st.args.interval
                    ))));
                    return Ok(());
                };
                let a = st.args.clone();
                let cache = st.history.clone();
                tokio::spawn(async move {
                    let _ = reply.send(forecast(&a, model, info, cache, n_steps).await);
                });
            }
        }
        Ok(())
    }
}

async fn forecast(
    a: &PredictorArgs,
    model: Arc<Mutex<Forecaster>>,
    info: ModelInfo,
    cache: HistoryCache,
    n_steps: usize,
) -> Result<ForecastResponse, ServeError> {
    let unavailable = |e: tickmesh_core::Error| ServeError::Unavailable(e.to_string());
    let history = {
        let mut c = cache.lock().await;
        let empty = model.lock().unwrap_or_else(|e| e.into_inner()).history();
        let fresh = refresh(a, &mut c, empty).await;
        if let Err(e) = fresh {
            *c = None;
            return Err(unavailable(e));
        }
        c.clone().expect("refreshed")
    };
    let Some((last_ts, last)) = history.last() else {
        return Err(ServeError::NotFound(format!(
            "no data for {} {}",
            a.ticker, a.interval
        )));
    };
    let points = tokio::task::spawn_blocking(move || {
        model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forecast(&history, n_steps)
    })
    .await
    .map_err(|e| ServeError::Unavailable(format!("forecast panicked: {e}")))?
    .map_err(unavailable)?;
    Ok(ForecastResponse {
        ticker: a.ticker.clone(),
        interval: a.interval,
        model: info,
        last_ts,
        last_close: last.c,
        forecasts: points,
    })
}
