//! `TrainerActor`: one per (ticker, interval). Receives `Train` with a job
//! (ticker, interval, assignment epoch, version, overrides, the snapshot to
//! resume from), waits for a slot of its node, tells its pool it started
//! (`Progress` of epoch 0), reads the ticker's rows from `aggregated_data`,
//! fits the model on a blocking thread (never on the reactor), sending each
//! finished epoch to its pool as `Progress`, and every `snapshot_every`
//! epochs saves a resumable snapshot under
//! `models/{ticker}/{interval}/.runs/{job}/a{epoch}/e{k}/` (the progress
//! names it). It publishes the checkpoint under the attempt's own version
//! and sends the outcome, success or failure, back to its `TrainerPool` as
//! `Finished`. Before every write it checks the job's lease: a trainer whose
//! lease was revoked or ran out stops and writes nothing more.

use std::sync::Arc;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tickmesh_core::config::{FeatureConfig, ModelKind, TrainConfig};
use tickmesh_core::types::Interval;
use tickmesh_core::{Error, Result};
use tickmesh_io::db::Db;
use tickmesh_io::store::{buckets, SharedStore};
use tickmesh_model::checkpoint::{self, Files, Meta};
use tickmesh_model::dataset::Dataset;
use tickmesh_model::fit::{fingerprint, fit_with, EpochProgress, FitHooks, Fitted, Snapshot};
use tickmesh_model::fused::Member;
use tickmesh_model::metrics::EvalReport;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::lease::Leases;
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
    /// Snapshot (bucket `models`) of an earlier attempt to resume from.
    pub resume_key: Option<String>,
    /// 1 for the first attempt.
    pub attempt: u32,
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
    /// The champion of the (ticker, interval) when the job started, scored
    /// on this version's test window (the promotion gate compares them).
    pub champion: Option<ChampionScore>,
    /// The data it was trained on (the retrain policy counts rows after it).
    pub data: tickmesh_model::checkpoint::DataRange,
}

/// The champion, scored on a challenger's test window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChampionScore {
    pub version: i64,
    /// Its metrics on the same window; `None` when it could not be scored
    /// (`note` says why: its checkpoint is unreadable, or no window of its
    /// shape falls in the range).
    pub report: Option<EvalReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl TrainOutcome {
    /// The metrics a report carries: the version's (beside naive) and,
    /// under `champion`, the champion's on the same window.
    pub fn metrics_json(&self) -> Result<String> {
        let mut v = serde_json::to_value(self.metrics)
            .map_err(|e| Error::invalid("metrics", e.to_string()))?;
        let enc = |e: serde_json::Error| Error::invalid("metrics", e.to_string());
        if let Some(o) = v.as_object_mut() {
            if let Some(c) = &self.champion {
                o.insert("champion".into(), serde_json::to_value(c).map_err(enc)?);
            }
            o.insert(
                "data".into(),
                serde_json::to_value(&self.data).map_err(enc)?,
            );
        }
        Ok(v.to_string())
    }
}

/// Whether a checkpoint's model has the architecture `c` trains (its
/// weights can start the fit).
fn same_shape(m: &Meta, c: &TrainConfig) -> bool {
    m.kind == c.model
        && m.features == c.features
        && m.seq_len == c.seq_len
        && m.hidden == c.hidden
        && m.layers == c.layers
        && (m.kind != ModelKind::CnnLstm
            || (m.conv_channels == c.conv_channels && m.kernel_size == c.kernel_size))
}

/// The champion's checkpoint and rows when a job starts; `Ok(None)` without
/// one. A champion whose checkpoint does not verify is scored as
/// unreadable (the gate then compares with naive alone); a store or
/// database failure fails the job, which is retried.
async fn champion_of(
    args: &TrainerArgs,
    job: &Job,
) -> Result<
    Option<(
        i64,
        std::result::Result<(Meta, Bytes, Vec<tickmesh_core::types::AggRow>), String>,
    )>,
> {
    let Some(c) = args
        .db
        .models(Some(&job.ticker), Some(job.interval), false)
        .await?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    match checkpoint::read(
        args.store.as_ref(),
        &job.ticker,
        job.interval,
        c.version,
        &c.sha256,
    )
    .await
    {
        Ok((meta, weights)) => {
            let rows = args
                .db
                .read_aggregated(&job.ticker, job.interval, &meta.features, None)
                .await?;
            Ok(Some((c.version, Ok((meta, weights, rows)))))
        }
        Err(e @ Error::Invalid { .. }) => Ok(Some((c.version, Err(e.to_string())))),
        Err(e) => Err(e),
    }
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
    /// The indicator periods `aggregated_data` was computed with (recorded
    /// in the checkpoint, so the forecaster advances the same indicators).
    pub features: FeatureConfig,
    pub device: tch::Device,
    /// Bounds how many trainers of this node fit at once.
    pub slots: Arc<Semaphore>,
    /// The node's leases (the pool renews them).
    pub leases: Leases,
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
                        snapshot: None,
                    })?;
                    let p = pool.clone();
                    let j = job.clone();
                    train_job(state, &job, move |e, snapshot| {
                        let _ = p.cast(PoolMsg::Progress {
                            job: j.clone(),
                            progress: e,
                            snapshot,
                        });
                    })
                    .await
                    .map(Box::new)
                    .map_err(|e| e.to_string())
                };
                pool.cast(PoolMsg::Finished { job, outcome })?;
            }
        }
        Ok(())
    }
}

/// The fit's hooks for a cluster job: lease checks, progress, snapshots.
struct JobHooks<P> {
    job: Job,
    leases: Leases,
    store: SharedStore,
    every: usize,
    rt: tokio::runtime::Handle,
    progress: P,
    last: Option<EpochProgress>,
    /// The champion's weights to start from (a warm start).
    warm: Option<Vec<(String, tch::Tensor)>>,
}

impl<P: FnMut(EpochProgress, Option<String>)> JobHooks<P> {
    fn lease(&self) -> Result<()> {
        self.leases
            .wait_valid(&self.job.id, self.job.epoch)
            .map_err(Error::Conflict)
    }
}

impl<P: FnMut(EpochProgress, Option<String>)> FitHooks for JobHooks<P> {
    fn epoch(&mut self, p: EpochProgress) -> Result<()> {
        self.lease()?;
        self.last = Some(p);
        (self.progress)(p, None);
        Ok(())
    }

    fn snapshot_every(&self) -> usize {
        self.every
    }

    fn initial_weights(&mut self) -> Option<Vec<(String, tch::Tensor)>> {
        self.warm.take()
    }

    fn snapshot(&mut self, s: Snapshot) -> Result<()> {
        let (tensors, state) = s.encode()?;
        let key = format!("{}/e{}", runs_prefix(&self.job), s.state.epoch);
        self.lease()?;
        let store = self.store.clone();
        let k = key.clone();
        self.rt.block_on(async move {
            store
                .put(
                    buckets::MODELS,
                    &format!("{k}/state.safetensors"),
                    Bytes::from(tensors),
                )
                .await?;
            // state.json last: a snapshot without it is incomplete and never read.
            store
                .put(
                    buckets::MODELS,
                    &format!("{k}/state.json"),
                    Bytes::from(state),
                )
                .await
        })?;
        if let Some(p) = self.last {
            (self.progress)(p, Some(key));
        }
        Ok(())
    }
}

/// Where a job's snapshots live (bucket `models`), per attempt.
pub fn runs_prefix(job: &Job) -> String {
    format!("{}a{}", job_runs_prefix(job), job.epoch)
}

/// Every snapshot of a job, all attempts (removed once its checkpoint is accepted).
pub fn job_runs_prefix(job: &Job) -> String {
    format!("{}/{}/.runs/{}/", job.ticker, job.interval, job.id)
}

/// Reads the snapshot a job resumes from; `None` (and a warning) when there
/// is none or it cannot be read: the job then starts from scratch.
async fn read_snapshot(store: &SharedStore, job: &Job) -> Option<Snapshot> {
    let key = job.resume_key.as_ref()?;
    let read = async {
        let state = store
            .get(buckets::MODELS, &format!("{key}/state.json"))
            .await?
            .ok_or_else(|| Error::NotFound(format!("{key}/state.json")))?;
        let tensors = store
            .get(buckets::MODELS, &format!("{key}/state.safetensors"))
            .await?
            .ok_or_else(|| Error::NotFound(format!("{key}/state.safetensors")))?;
        Snapshot::decode(&tensors, &state)
    };
    match read.await {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(job = %job.id, %key, error = %e, "cannot read the snapshot; training starts from scratch");
            None
        }
    }
}

/// The champion's version and its checkpoint with its rows, or why they
/// could not be read.
type ChampionRead = (
    i64,
    std::result::Result<(Meta, Bytes, Vec<tickmesh_core::types::AggRow>), String>,
);

/// What a job needs before its fit: its rows, the snapshot it resumes from
/// and the champion to score.
struct Prepared {
    cfg: TrainConfig,
    rows: Vec<tickmesh_core::types::AggRow>,
    resume: Option<Snapshot>,
    champion: Option<ChampionRead>,
}

/// Reads a job's rows (failing on an unknown ticker), its snapshot and its
/// champion.
async fn prepare(args: &TrainerArgs, job: &Job) -> Result<Prepared> {
    let cfg = job.config(&args.train);
    let mut rows = args
        .db
        .read_aggregated(&job.ticker, job.interval, &cfg.features, None)
        .await?;
    if rows.is_empty() {
        return Err(Error::NotFound(format!(
            "unknown ticker {}: no aggregated_data rows for interval {}",
            job.ticker, job.interval
        )));
    }
    let resume = read_snapshot(&args.store, job).await;
    let mut champion = champion_of(args, job).await?;
    if let Some(s) = &resume {
        // The resumed fit sees exactly the rows the snapshot was trained on.
        rows.retain(|r| r.ts <= s.state.data_to);
        if let Some((_, Ok((_, _, rows)))) = &mut champion {
            rows.retain(|r| r.ts <= s.state.data_to);
        }
    }
    Ok(Prepared {
        cfg,
        rows,
        resume,
        champion,
    })
}

/// On the training thread: the job's dataset (with its failpoints), the
/// snapshot check and the warm start (set on `hooks`); the champion version
/// it warm-starts from.
fn dataset_of<P>(
    p: &mut Prepared,
    job: &Job,
    hooks: &mut JobHooks<P>,
) -> Result<(Dataset, Option<i64>)> {
    let (ticker, job_id, c) = (&job.ticker, &job.id, &p.cfg);
    // Failpoint for the process tests: a training thread that panics.
    if std::env::var("TICKMESH_FAILPOINT_PANIC_TICKER").is_ok_and(|t| t == *ticker) {
        panic!("failpoint TICKMESH_FAILPOINT_PANIC_TICKER={ticker}");
    }
    let mut ds = Dataset::build(
        &p.rows,
        &c.features,
        c.seq_len,
        c.val_fraction,
        c.test_fraction,
    )?;
    // Failpoint for the promotion gate's tests: a deliberately worse
    // model (trained on shuffled targets, from scratch).
    let sabotaged = std::env::var("TICKMESH_FAILPOINT_SHUFFLE_TARGETS").is_ok_and(|t| t == *ticker);
    if sabotaged {
        warn!(job = %job_id, "failpoint: training on shuffled targets");
        ds.shuffle_training_targets(job.version as u64);
    }
    if let Some(s) = &p.resume {
        if s.state.fingerprint != fingerprint(&ds, c) {
            warn!(job = %job_id, "the snapshot was taken on other data or hyperparameters; training starts from scratch");
            p.resume = None;
        } else {
            info!(job = %job_id, epoch = s.state.epoch, "resuming from the snapshot");
        }
    }
    // A warm start from a champion of the same architecture (a resumed
    // fit has its own weights).
    let warm_from = match (&p.champion, &p.resume) {
        (Some((v, Ok((m, w, _)))), None) if c.warm_start && !sabotaged && same_shape(m, c) => {
            let (vs, _) = checkpoint::load_model(m, w, tch::Device::Cpu)?;
            hooks.warm = Some(vs.variables().into_iter().collect());
            info!(job = %job_id, champion = v, "warm start from the champion's weights");
            Some(*v)
        }
        _ => None,
    };
    Ok((ds, warm_from))
}

/// On the training thread: the checkpoint's files and the champion scored
/// on its test window.
fn finish(
    fitted: &Fitted,
    p: Prepared,
    job: &Job,
    indicators: &FeatureConfig,
    warm_from: Option<i64>,
) -> Result<(Meta, Files, Option<ChampionScore>)> {
    let weights = checkpoint::weights_bytes(&fitted.vs)?;
    let mut meta = Meta::of(
        fitted,
        &p.cfg,
        indicators,
        &job.ticker,
        job.interval,
        job.version,
        &weights,
    );
    meta.warm_start_from = warm_from;
    let files = Files::new(&meta, weights, &fitted.test_points)?;
    // The champion on this version's test window.
    let champion = p.champion.map(|(version, read)| {
        let (from, to) = (meta.splits.test_from, meta.splits.test_to);
        let scored = read.and_then(|(m, w, rows)| {
            tickmesh_model::fit::evaluate_range(&m, &w, &rows, Some(from), Some(to))
                .map_err(|e| e.to_string())
        });
        match scored {
            Ok(Some(s)) => ChampionScore {
                version,
                report: Some(s.report),
                note: (s.report.model.samples != meta.metrics.model.samples).then(|| {
                    format!(
                        "scored on {} of the window's {} bars",
                        s.report.model.samples, meta.metrics.model.samples
                    )
                }),
            },
            Ok(None) => ChampionScore {
                version,
                report: None,
                note: Some(
                    "no window of the champion's shape predicts a bar of the test window".into(),
                ),
            },
            Err(e) => ChampionScore {
                version,
                report: None,
                note: Some(format!("the champion could not be scored: {e}")),
            },
        }
    });
    Ok((meta, files, champion))
}

/// Publishes a finished job's checkpoint under its version once its lease
/// is confirmed.
async fn publish(
    args: &TrainerArgs,
    job: &Job,
    (meta, files, champion): (Meta, Files, Option<ChampionScore>),
    started: std::time::Instant,
) -> Result<TrainOutcome> {
    let (leases, id, epoch) = (args.leases.clone(), job.id.clone(), job.epoch);
    tokio::task::spawn_blocking(move || leases.wait_valid(&id, epoch))
        .await
        .map_err(|e| Error::invalid("training", e.to_string()))?
        .map_err(Error::Conflict)?;
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
        secs = started.elapsed().as_secs_f64(), fused_group = meta.fused_group.unwrap_or(1),
        rmse = m.model.rmse, naive_rmse = m.naive.rmse,
        directional_accuracy = m.model.directional_accuracy.unwrap_or_default(),
        uri = %published.uri, "checkpoint published"
    );
    if let Some(c) = &champion {
        info!(ticker = %job.ticker, interval = %job.interval, version = job.version, champion = c.version,
            champion_rmse = c.report.map(|r| r.model.rmse), note = c.note.as_deref().unwrap_or(""),
            "the champion scored on this version's test window");
    }
    Ok(TrainOutcome {
        uri: published.uri,
        digest: published.digest,
        kind: meta.kind,
        metrics: meta.metrics,
        champion,
        data: meta.data.clone(),
    })
}

fn hooks_of<P>(args: &TrainerArgs, job: &Job, progress: P) -> JobHooks<P> {
    JobHooks {
        job: job.clone(),
        leases: args.leases.clone(),
        store: args.store.clone(),
        every: job.config(&args.train).snapshot_every,
        rt: tokio::runtime::Handle::current(),
        progress,
        last: None,
        warm: None,
    }
}

/// Runs one job end to end: rows → fit (resumed from the job's snapshot
/// when it has one) → checkpoint, published under the attempt's version.
/// `progress` gets each finished epoch, and the key of each snapshot saved.
pub async fn train_job(
    args: &TrainerArgs,
    job: &Job,
    progress: impl FnMut(EpochProgress, Option<String>) + Send + 'static,
) -> Result<TrainOutcome> {
    let mut p = prepare(args, job).await?;
    let started = std::time::Instant::now();
    let (device, indicators) = (args.device, args.features.clone());
    let mut hooks = hooks_of(args, job, progress);
    let j = job.clone();
    let done = tokio::task::spawn_blocking(move || {
        let (ds, warm_from) = dataset_of(&mut p, &j, &mut hooks)?;
        let resume = p.resume.take();
        let fitted = fit_with(ds, &p.cfg, device, resume, &mut hooks)?;
        finish(&fitted, p, &j, &indicators, warm_from)
    })
    .await
    .map_err(|e| Error::invalid("training", format!("the training thread panicked: {e}")))??;
    publish(args, job, done, started).await
}

/// Trains `jobs` (distinct series, one kind and shape, none resuming a
/// snapshot) fused on the node's device, in groups that fit
/// `train.fuse_memory_mb`: each job's rows, champion and hooks are its own
/// (progress, lease checks, snapshots, a warm start), and each ends as its
/// own checkpoint, published under its own version. A job whose
/// preparation fails, or whose failpoint panics, fails alone. `progress`
/// gets each job's epochs and snapshot keys. One outcome per job, in order.
pub async fn train_group<P>(
    args: &TrainerArgs,
    jobs: &[Job],
    progress: P,
) -> Vec<Result<TrainOutcome>>
where
    P: Fn(&Job, EpochProgress, Option<String>) + Clone + Send + Sync + 'static,
{
    let started = std::time::Instant::now();
    let mut out: Vec<Option<Result<TrainOutcome>>> = jobs.iter().map(|_| None).collect();
    let mut ready = Vec::new();
    for (k, job) in jobs.iter().enumerate() {
        match prepare(args, job).await {
            Ok(p) => {
                let pr = progress.clone();
                let j = job.clone();
                let hooks = hooks_of(args, job, move |e, s| pr(&j, e, s));
                ready.push((k, p, hooks));
            }
            Err(e) => out[k] = Some(Err(e)),
        }
    }
    let (device, indicators, base) = (args.device, args.features.clone(), args.train.clone());
    let js = jobs.to_vec();
    let budget = (base.fuse_memory_mb as u64) << 20;
    let done = tokio::task::spawn_blocking(move || {
        let mut results = Vec::new();
        let mut members = Vec::new();
        for (k, mut p, mut hooks) in ready {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                dataset_of(&mut p, &js[k], &mut hooks)
            }));
            match r {
                Ok(Ok((ds, warm_from))) => members.push((k, p, hooks, ds, warm_from)),
                Ok(Err(e)) => results.push((k, Err(e))),
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    results.push((k, Err(Error::invalid("training", format!("the training thread panicked: {why}")))));
                }
            }
        }
        // Groups that fit the memory budget, in order.
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut used = 0u64;
        for (i, m) in members.iter().enumerate() {
            let b = tickmesh_model::fused::member_bytes(&m.3, &m.1.cfg);
            match groups.last_mut() {
                Some(g) if used + b <= budget && g.len() < base.fuse_group_on(device.is_cuda()) => {
                    g.push(i);
                    used += b;
                }
                _ => {
                    groups.push(vec![i]);
                    used = b;
                }
            }
        }
        let mut slots: Vec<Option<_>> = members.into_iter().map(Some).collect();
        for g in groups {
            let mut taken: Vec<_> = g.iter().map(|&i| slots[i].take().expect("once")).collect();
            let cfg = taken[0].1.cfg.clone();
            let fitted: Vec<Result<Fitted>> = if taken.len() == 1 {
                let (_, p, hooks, ds, _) = &mut taken[0];
                vec![fit_with(ds.clone(), &p.cfg, device, None, hooks)]
            } else {
                info!(members = taken.len(), kind = %cfg.model, device = %tickmesh_model::device_name(device), "training fused");
                let fused = tickmesh_model::fused::fit_fused(
                    taken
                        .iter_mut()
                        .map(|(_, _, hooks, ds, _)| Member {
                            ds: ds.clone(),
                            hooks,
                        })
                        .collect(),
                    &cfg,
                    device,
                );
                match fused {
                    Ok(v) => v,
                    Err(e) => taken.iter().map(|_| Err(Error::invalid("fused training", e.to_string()))).collect(),
                }
            };
            for ((k, p, _, _, warm_from), f) in taken.into_iter().zip(fitted) {
                let r = f.and_then(|f| finish(&f, p, &js[k], &indicators, warm_from));
                results.push((k, r));
            }
        }
        results
    })
    .await;
    match done {
        Ok(results) => {
            for (k, r) in results {
                out[k] = Some(match r {
                    Ok(files) => publish(args, &jobs[k], files, started).await,
                    Err(e) => Err(e),
                });
            }
        }
        Err(e) => {
            for o in out.iter_mut().filter(|o| o.is_none()) {
                *o = Some(Err(Error::invalid(
                    "training",
                    format!("the training thread panicked: {e}"),
                )));
            }
        }
    }
    out.into_iter()
        .map(|o| o.unwrap_or_else(|| Err(Error::invalid("training", "no outcome"))))
        .collect()
}
