//! `TrainerActor`: one per (ticker, interval). Receives `Train` with a job
//! (ticker, interval, epoch, version), reads the ticker's rows from
//! `aggregated_data`, fits the model on a blocking thread (never on the
//! reactor), writes the checkpoint to the object store and sends the
//! outcome back to its `TrainerPool`.

use std::sync::Arc;

use chrono::Utc;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tickmesh_core::config::TrainConfig;
use tickmesh_core::db::Db;
use tickmesh_core::store::{sha256_hex, SharedStore};
use tickmesh_core::types::Interval;
use tickmesh_core::{Error, Result};
use tokio::sync::Semaphore;
use tracing::info;

use crate::checkpoint::{self, DataRange, Meta};
use crate::dataset::TARGET;
use crate::fit::{fit, EvalReport};
use crate::pool::PoolMsg;

/// A training job as assigned by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub ticker: String,
    pub interval: Interval,
    pub epoch: i64,
    pub version: i64,
}

/// What a finished job produced.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub uri: String,
    pub sha256: String,
    pub kind: String,
    pub metrics: EvalReport,
}

pub struct TrainerActor;

/// Messages of [`TrainerActor`].
pub enum TrainerMsg {
    /// Train this job; the outcome goes to `pool` as `PoolMsg::Finished`.
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
                    train_job(state, &job).await.map_err(|e| e.to_string())
                };
                pool.cast(PoolMsg::Finished { job, outcome })?;
            }
        }
        Ok(())
    }
}

/// Runs one job end to end: rows → fit → checkpoint.
pub async fn train_job(args: &TrainerArgs, job: &Job) -> Result<TrainOutcome> {
    let rows = args
        .db
        .read_aggregated(&job.ticker, job.interval, &args.train.features, None)
        .await?;
    if rows.is_empty() {
        return Err(Error::NotFound(format!(
            "unknown ticker {}: no aggregated_data rows for interval {}",
            job.ticker, job.interval
        )));
    }
    let cfg = args.train.clone();
    let device = args.device;
    let ticker = job.ticker.clone();
    let interval = job.interval;
    let started = std::time::Instant::now();
    let (fitted, weights) = tokio::task::spawn_blocking(move || -> Result<_> {
        let fitted = fit(&rows, &cfg, device, |p| {
            info!(ticker = %ticker, %interval, epoch = p.epoch, epochs = p.epochs, train_loss = p.train_loss, val_loss = p.val_loss, "epoch");
        })?;
        let weights = checkpoint::weights_bytes(&fitted.vs)?;
        Ok((fitted, weights))
    })
    .await
    .expect("training task panicked")?;
    let ds = &fitted.dataset;
    let meta = Meta {
        kind: args.train.model.clone(),
        ticker: job.ticker.clone(),
        interval: job.interval,
        version: job.version,
        features: args.train.features.clone(),
        target: TARGET.into(),
        target_scale: ds.target_scale,
        seq_len: args.train.seq_len,
        hidden: args.train.hidden,
        layers: args.train.layers,
        scaler: ds.scaler.clone(),
        hyperparameters: args.train.clone(),
        metrics: fitted.eval,
        data: DataRange {
            from: ds.ts[0],
            to: *ds.ts.last().expect("dataset is not empty"),
            rows: ds.rows.len(),
        },
        epochs_run: fitted.epochs_run,
        best_epoch: fitted.best_epoch,
        sha256: sha256_hex(&weights),
        device: crate::device_name(fitted.device),
        trained_at: Utc::now(),
    };
    let uri = checkpoint::write(args.store.as_ref(), &meta, weights, &fitted.validation).await?;
    let m = &fitted.eval;
    info!(
        ticker = %job.ticker, interval = %job.interval, version = job.version,
        secs = started.elapsed().as_secs_f64(),
        rmse = m.model.rmse, naive_rmse = m.naive.rmse,
        directional_accuracy = m.model.directional_accuracy.unwrap_or_default(),
        %uri, "checkpoint written"
    );
    Ok(TrainOutcome {
        uri,
        sha256: meta.sha256,
        kind: meta.kind,
        metrics: fitted.eval,
    })
}
