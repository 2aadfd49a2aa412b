//! `PredictorActor`: one per (ticker, interval). Receives `Load` with a new
//! model version and `Forecast` requests. A load runs in its own task (read
//! the checkpoint, verify its sha256, build the model) and comes back as
//! `Swap`, so requests keep being answered by the current version until the
//! new one is ready; a checkpoint that fails verification is refused and the
//! current version keeps serving. Forecasts run on blocking threads.

use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::Serialize;
use tickmesh_core::db::Db;
use tickmesh_core::store::SharedStore;
use tickmesh_core::types::{Bar, Interval};
use tickmesh_train::checkpoint::{self, Meta};
use tickmesh_train::fit::EvalReport;
use tickmesh_train::forecast::{ForecastPoint, Forecaster, WARMUP_BARS};
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
    pub kind: String,
    pub trained_at: chrono::DateTime<chrono::Utc>,
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

pub struct PredictorState {
    args: PredictorArgs,
    current: Option<(Arc<Mutex<Forecaster>>, ModelInfo)>,
}

fn info_of(meta: &Meta) -> ModelInfo {
    ModelInfo {
        ticker: meta.ticker.clone(),
        interval: meta.interval,
        version: meta.version,
        kind: meta.kind.clone(),
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
                if st
                    .current
                    .as_ref()
                    .is_some_and(|(_, i)| i.version >= v.version)
                {
                    return Ok(());
                }
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
                        .expect("model load panicked")
                    }
                    .await;
                    match loaded {
                        Ok(f) => {
                            let _ = myself.cast(PredictorMsg::Swap(Box::new(f)));
                        }
                        Err(e) => {
                            warn!(ticker = %a.ticker, interval = %a.interval, version = v.version, error = %e,
                            "model version refused; the current version keeps serving")
                        }
                    }
                });
            }
            PredictorMsg::Swap(f) => {
                let info = info_of(&f.meta);
                if st
                    .current
                    .as_ref()
                    .is_some_and(|(_, i)| i.version >= info.version)
                {
                    return Ok(());
                }
                info!(ticker = %info.ticker, interval = %info.interval, version = info.version, "model swapped in");
                st.args.registry.cast(RegistryMsg::Serving(info.clone()))?;
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
                tokio::spawn(async move {
                    let _ = reply.send(forecast(&a, model, info, n_steps).await);
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
    n_steps: usize,
) -> Result<ForecastResponse, ServeError> {
    let seq_len = model.lock().expect("forecaster lock").meta.seq_len;
    let cols: Vec<String> = ["open", "high", "low", "close", "volume"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rows =
        a.db.read_aggregated(&a.ticker, a.interval, &cols, Some(seq_len + WARMUP_BARS))
            .await
            .map_err(|e| ServeError::Unavailable(e.to_string()))?;
    let bars: Vec<Bar> = rows
        .iter()
        .filter_map(|r| {
            let v = |i: usize| r.values[i];
            Some(Bar {
                t: r.ts,
                o: v(0)?,
                h: v(1)?,
                l: v(2)?,
                c: v(3)?,
                v: v(4)? as u64,
                n: 0,
                vw: v(3)?,
            })
        })
        .collect();
    let last = *bars
        .last()
        .ok_or_else(|| ServeError::NotFound(format!("no data for {} {}", a.ticker, a.interval)))?;
    let points = tokio::task::spawn_blocking(move || {
        model
            .lock()
            .expect("forecaster lock")
            .forecast(&bars, n_steps)
    })
    .await
    .expect("forecast panicked")
    .map_err(|e| ServeError::Unavailable(e.to_string()))?;
    Ok(ForecastResponse {
        ticker: a.ticker.clone(),
        interval: a.interval,
        model: info,
        last_ts: last.t,
        last_close: last.c,
        forecasts: points,
    })
}
