//! `TrainerActor`: one per (ticker, interval). Receives `Train` with a job
//! (ticker, interval, assignment epoch, version, overrides), waits for a
//! slot of its node, tells its pool it started (`Progress` of epoch 0),
//! reads the ticker's rows from `aggregated_data`, fits the model on a
//! blocking thread (never on the reactor), sending each finished epoch to
//! its pool as `Progress`, publishes the checkpoint to the object store and sends the
//! outcome, success or failure, back to its `TrainerPool` as `Finished`.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tickmesh_core::config::{ModelKind, TrainConfig};
use tickmesh_core::db::Db;
use tickmesh_core::store::SharedStore;
use tickmesh_core::types::Interval;
use tickmesh_core::{Error, Result};
use tickmesh_model::checkpoint::{self, Files, Meta};
use tickmesh_model::dataset::Dataset;
use tickmesh_model::fit::{fit, EpochProgress};
use tickmesh_model::metrics::EvalReport;
use tokio::sync::Semaphore;
use tracing::info;

use crate::pool::PoolMsg;

/// A training job as assigned by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub ticker: String,
    pub interval: Interval,
    /// The assignment epoch (fencing).
    pub epoch: i64,
    pub version: i64,
    /// Overrides of the node's `[train]` config.
    pub model: Option<ModelKind>,
    pub epochs: Option<usize>,
}

impl Job {
    /// The node's training config with this job's overrides.
    pub fn config(&self, base: &TrainConfig) -> TrainConfig {
        let mut cfg = base.clone();
        if let Some(m) = self.model {
            cfg.model = m;
        }
        if let Some(e) = self.epochs {
            cfg.epochs = e;
        }
        cfg
    }
}

/// What a finished job produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub uri: String,
    /// The checkpoint digest (weights and meta.json).
    pub digest: String,
    pub kind: ModelKind,
    pub metrics: EvalReport,
}

pub struct TrainerActor;

/// Messages of [`TrainerActor`].
pub enum TrainerMsg {
    /// Train this job; progress and the outcome go to `pool`.
    Train { job: Job, pool: ActorRef<PoolMsg> },
}

impl ractor::Message for TrainerMsg {}

#[derive(Clone)]
pub struct TrainerArgs {
    pub db: Db,
    pub store: SharedStore,
    pub train: TrainConfig,
    pub device: tch::Device,
    /// Bounds how many trainers of this node fit at once.
    pub slots: Arc<Semaphore>,
}

impl Actor for TrainerActor {
    type Msg = TrainerMsg;
    type State = TrainerArgs;
    type Arguments = TrainerArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: TrainerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TrainerMsg::Train { job, pool } => {
                let outcome = {
                    let _slot = state.slots.clone().acquire_owned().await?;
                    // Epoch 0: started (the job leaves "queued" at the coordinator).
                    pool.cast(PoolMsg::Progress {
                        job: job.clone(),
                        progress: EpochProgress {
                            epoch: 0,
                            epochs: job.config(&state.train).epochs,
                            train_loss: 0.0,
                            val_loss: 0.0,
                            best_epoch: 0,
                        },
                    })?;
                    let p = pool.clone();
                    let j = job.clone();
                    train_job(state, &job, move |e| {
                        let _ = p.cast(PoolMsg::Progress {
                            job: j.clone(),
                            progress: e,
                        });
                    })
                    .await
                    .map_err(|e| e.to_string())
                };
                pool.cast(PoolMsg::Finished { job, outcome })?;
            }
        }
        Ok(())
    }
}

/// Runs one job end to end: rows → fit → checkpoint, published.
pub async fn train_job(
    args: &TrainerArgs,
    job: &Job,
    progress: impl FnMut(EpochProgress) + Send + 'static,
) -> Result<TrainOutcome> {
    let cfg = job.config(&args.train);
    let rows = args
        .db
        .read_aggregated(&job.ticker, job.interval, &cfg.features, None)
        .await?;
    if rows.is_empty() {
        return Err(Error::NotFound(format!(
            "unknown ticker {}: no aggregated_data rows for interval {}",
            job.ticker, job.interval
        )));
    }
    let device = args.device;
    let (ticker, interval, version) = (job.ticker.clone(), job.interval, job.version);
    let started = std::time::Instant::now();
    let c = cfg.clone();
    let (meta, files) = tokio::task::spawn_blocking(move || -> Result<(Meta, Files)> {
        let ds = Dataset::build(
            &rows,
            &c.features,
            c.seq_len,
            c.val_fraction,
            c.test_fraction,
        )?;
        let fitted = fit(ds, &c, device, progress)?;
        let weights = checkpoint::weights_bytes(&fitted.vs)?;
        let meta = Meta::of(&fitted, &c, &ticker, interval, version, &weights);
        let files = Files::new(&meta, weights, &fitted.test_points)?;
        Ok((meta, files))
    })
    .await
    .map_err(|e| Error::invalid("training", format!("the training thread panicked: {e}")))??;
    let published = checkpoint::publish(
        args.store.as_ref(),
        &job.ticker,
        job.interval,
        job.version,
        &files,
    )
    .await?;
    let m = &meta.metrics;
    info!(
        ticker = %job.ticker, interval = %job.interval, version = job.version, kind = %meta.kind,
        secs = started.elapsed().as_secs_f64(),
        rmse = m.model.rmse, naive_rmse = m.naive.rmse,
        directional_accuracy = m.model.directional_accuracy.unwrap_or_default(),
        uri = %published.uri, "checkpoint published"
    );
    Ok(TrainOutcome {
        uri: published.uri,
        digest: published.digest,
        kind: meta.kind,
        metrics: meta.metrics,
    })
}
