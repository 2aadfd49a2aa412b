//! `TrainerPool`: the train role's node agent, on the ractor_cluster mesh.
//! Its [`TrainerPort`] (a child, `tickmesh.trainer.NODE` in the group
//! `trainers`) receives the coordinator's assignments. A session task
//! registers the node with the coordinator's port (its slots, a random
//! incarnation, and the jobs it still runs), then heartbeats: each one
//! renews the leases of the jobs the node holds and releases those the
//! coordinator revoked. When the coordinator leaves the mesh or forgets the
//! node, the session registers again with a jittered, doubling backoff, and
//! the trainers keep going meanwhile (a trainer whose lease runs out pauses
//! before its next write for up to one lease term, waiting for the renewal
//! that re-registration brings).
//!
//! The pool receives assignments from its port, grants their leases and
//! batches them: jobs that arrive within `train.fuse_wait_ms` of each other
//! and share a kind and shape (and none resumes a snapshot) train as one
//! fused group of up to `train.fuse_group` (`cpu_fuse_group` on the CPU) in
//! a task holding one training slot ([`train_group`]); any other job goes
//! to the `TrainerActor` of its (ticker, interval) (spawned linked on
//! first use). The node registers `slots` × the group size as its slots.
//! Either way it forwards progress (and snapshot keys) and
//! reports every outcome back with the job's assignment epoch: a
//! checkpoint, or a failure with its reason. A job whose lease is gone is
//! not reported (the coordinator has moved on). A trainer that crashes is
//! dropped, its job reported failed, and it is respawned on its next job.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tickmesh_core::config::Role;
use tickmesh_core::types::Interval;
use tickmesh_io::store::buckets;
use tickmesh_model::fit::EpochProgress;
use tickmesh_proto::mesh::{
    self, CheckpointAck, CheckpointReport, CoordinatorPortMsg, Heartbeat, HeldJob, JobFailure,
    JobProgress, Register,
};
use tracing::{error, info, warn};

use crate::lease::{term, Leases};
use crate::port::TrainerPort;
use crate::trainer::{
    job_runs_prefix, train_group, Job, TrainOutcome, TrainerActor, TrainerArgs, TrainerMsg,
};

#[derive(Clone, Copy)]
pub struct TrainerPool;

/// Messages of [`TrainerPool`].
pub enum PoolMsg {
    /// The coordinator assigned a job (from the pool's port).
    Assigned(Job),
    /// A trainer finished a training epoch of a job (and maybe saved a snapshot).
    Progress {
        job: Job,
        progress: EpochProgress,
        snapshot: Option<String>,
    },
    /// The batching window is over: train the pending jobs, fused where
    /// they share a kind and shape.
    Flush,
    /// A trainer finished a job (from the trainer).
    Finished {
        job: Job,
        outcome: Result<Box<TrainOutcome>, String>,
    },
}

impl ractor::Message for PoolMsg {}

#[derive(Clone)]
pub struct TrainerPoolArgs {
    pub node: String,
    /// The cluster's namespace on the mesh.
    pub scope: mesh::Scope,
    pub cpus: u32,
    pub gpus: u32,
    /// Jobs this node takes at once (registered with the coordinator):
    /// `computations` times `train.fuse_group`.
    pub slots: u32,
    /// Trainings this node runs at once (the size of `trainer.slots`): a
    /// job alone, or a fused group of jobs.
    pub computations: u32,
    pub trainer: TrainerArgs,
}

/// The coordinator's timing, as its last registration reply said.
#[derive(Debug, Clone, Copy)]
struct Timing {
    heartbeat: Duration,
    lease: Duration,
}

pub struct TrainerPoolState {
    args: TrainerPoolArgs,
    port: ActorCell,
    timing: Arc<Mutex<Timing>>,
    trainers: HashMap<(String, Interval), (ActorRef<TrainerMsg>, Option<Job>)>,
    /// Jobs waiting for the batching window (`train.fuse_wait_ms`) to close.
    pending: Vec<Job>,
    flush_scheduled: bool,
    /// Series whose job trains in a fused group now.
    fusing: HashSet<(String, Interval)>,
    tasks: Tasks,
}

fn held(leases: &Leases) -> Vec<HeldJob> {
    leases
        .held()
        .into_iter()
        .map(|(job_id, epoch)| HeldJob { job_id, epoch })
        .collect()
}

/// A doubling backoff with jitter, 200 ms to 5 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(Duration::from_millis(200))
    }

    async fn wait(&mut self) {
        let jitter = rand::random::<u64>() % (self.0.as_millis() as u64 / 2 + 1);
        tokio::time::sleep(self.0 + Duration::from_millis(jitter)).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

/// The pool's session and heartbeat tasks, aborted when the pool's state is
/// dropped: also when the pool fails, where ractor skips `post_stop`, so an
/// old incarnation never keeps heartbeating for a new one.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Whether the pool has stopped (its tasks then end too).
fn gone(me: &ActorRef<PoolMsg>) -> bool {
    matches!(
        me.get_status(),
        ractor::ActorStatus::Stopping | ractor::ActorStatus::Stopped
    )
}

/// How long a registration may take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a report may take (each of its tries).
const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// Registers with the coordinator's port and heartbeats, registering again
/// whenever the coordinator leaves the mesh or forgets the node, until the
/// pool stops.
async fn session(
    me: ActorRef<PoolMsg>,
    args: TrainerPoolArgs,
    incarnation: u64,
    timing: Arc<Mutex<Timing>>,
) {
    let mut backoff = Backoff::new();
    let mut first = true;
    loop {
        if !first {
            backoff.wait().await;
        }
        first = false;
        if gone(&me) {
            return;
        }
        let req = Register {
            node: args.node.clone(),
            roles: vec![Role::Train.as_str().into()],
            cpus: args.cpus,
            gpus: args.gpus,
            incarnation,
            slots: args.slots,
            running: held(&args.trainer.leases),
        };
        let reply = args
            .scope
            .ask(
                "register",
                |reply| CoordinatorPortMsg::Register(req.into(), reply),
                REGISTER_TIMEOUT,
            )
            .await
            .and_then(|r| r);
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                warn!(node = %args.node, error = %e, "not registered with the coordinator yet");
                continue;
            }
        };
        let t = {
            let mut t = timing.lock().unwrap_or_else(|p| p.into_inner());
            t.heartbeat = Duration::from_secs(reply.heartbeat_secs.max(1));
            t.lease = Duration::from_secs(reply.lease_secs.max(2));
            args.trainer.leases.set_patience(t.lease);
            *t
        };
        info!(node = %args.node, device = %tickmesh_model::device_name(args.trainer.device), slots = args.slots, heartbeat_s = t.heartbeat.as_secs(), lease_s = t.lease.as_secs(), "trainer pool registered with the coordinator");
        backoff = Backoff::new();
        if !heartbeats(&me, &args, incarnation, &timing).await {
            return;
        }
    }
}

/// Renews the held jobs' leases every heartbeat period. Returns when the
/// node must register again (true), or when the pool stopped (false).
async fn heartbeats(
    me: &ActorRef<PoolMsg>,
    args: &TrainerPoolArgs,
    incarnation: u64,
    timing: &Arc<Mutex<Timing>>,
) -> bool {
    let (node, leases, scope) = (&args.node, &args.trainer.leases, &args.scope);
    let mut admin_state = String::new();
    loop {
        let t = *timing.lock().unwrap_or_else(|p| p.into_inner());
        tokio::time::sleep(t.heartbeat).await;
        if gone(me) {
            return false;
        }
        if let Err(e) = scope.coordinator() {
            warn!(error = %e, "the coordinator left the mesh; registering again when it is back");
            return true;
        }
        let sent = Instant::now();
        let held_now = leases.held();
        let req = Heartbeat {
            node: node.to_string(),
            incarnation,
            held: held(leases),
        };
        let r = scope
            .ask(
                "heartbeat",
                |reply| CoordinatorPortMsg::Heartbeat(req.into(), reply),
                t.heartbeat.max(Duration::from_secs(2)),
            )
            .await
            .and_then(|r| r);
        match r {
            Ok(r) => {
                if !r.registered {
                    warn!("the coordinator does not know this node; registering again");
                    return true;
                }
                if r.admin_state != admin_state {
                    match r.admin_state.as_str() {
                        "" => info!("an operator made this node assignable again"),
                        s => {
                            warn!(state = %s, "an operator {s} this node: nothing new comes to it")
                        }
                    }
                    admin_state = r.admin_state.clone();
                }
                for id in &r.revoked {
                    warn!(job = %id, "the coordinator revoked the job; its trainer stops writing");
                    leases.release(id);
                }
                let renewed: Vec<(String, i64)> = held_now
                    .into_iter()
                    .filter(|(id, _)| !r.revoked.contains(id))
                    .collect();
                let lease = Duration::from_secs(r.lease_secs.max(2));
                leases.renew(&renewed, term(sent, lease, t.heartbeat));
            }
            Err(e) => {
                warn!(error = %e, "heartbeat failed; leases run out unless a later one succeeds")
            }
        }
    }
}

impl Actor for TrainerPool {
    type Msg = PoolMsg;
    type State = TrainerPoolState;
    type Arguments = TrainerPoolArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: TrainerPoolArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut args = args;
        // Each incarnation has its own leases and slots: a restarted pool
        // announces no job (the coordinator takes back what the old one
        // held), and what the old one's training threads still hold runs
        // out instead of being renewed.
        args.trainer.leases = Leases::default();
        args.trainer.slots = Arc::new(tokio::sync::Semaphore::new(
            args.computations.max(1) as usize
        ));
        let port = TrainerPort::spawn(&args.scope, &args.node, myself.clone()).await?;
        let incarnation = rand::random::<u64>();
        let timing = Arc::new(Mutex::new(Timing {
            heartbeat: Duration::from_secs(1),
            lease: Duration::from_secs(2),
        }));
        let session = tokio::spawn(session(
            myself.clone(),
            args.clone(),
            incarnation,
            timing.clone(),
        ));
        Ok(TrainerPoolState {
            args,
            port,
            timing,
            trainers: HashMap::new(),
            pending: Vec::new(),
            flush_scheduled: false,
            fusing: HashSet::new(),
            tasks: Tasks(vec![session]),
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for t in &state.tasks.0 {
            t.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PoolMsg::Assigned(job) => {
                info!(ticker = %job.ticker, interval = %job.interval, epoch = job.epoch, version = job.version, attempt = job.attempt, job = %job.id, "job assigned");
                let t = *state.timing.lock().unwrap_or_else(|p| p.into_inner());
                state.args.trainer.leases.grant(
                    &job.id,
                    job.epoch,
                    term(Instant::now(), t.lease, t.heartbeat),
                );
                let key = (job.ticker.clone(), job.interval);
                let busy = state.trainers.get(&key).is_some_and(|(_, j)| j.is_some())
                    || state.fusing.contains(&key)
                    || state
                        .pending
                        .iter()
                        .any(|p| p.ticker == job.ticker && p.interval == job.interval);
                let train = &state.args.trainer.train;
                let group = train.fuse_group_on(state.args.trainer.device.is_cuda());
                if group > 1 && job.resume_key.is_none() && !busy {
                    // Wait a moment for more jobs to fuse with.
                    state.pending.push(job);
                    if !state.flush_scheduled {
                        state.flush_scheduled = true;
                        myself.send_after(Duration::from_millis(train.fuse_wait_ms), || {
                            PoolMsg::Flush
                        });
                    }
                    return Ok(());
                }
                train_alone(&myself, state, job).await?;
            }
            PoolMsg::Flush => {
                state.flush_scheduled = false;
                let base = state.args.trainer.train.clone();
                // The shape is the node's config but for a job's overrides.
                let mut by: BTreeMap<(String, usize), Vec<Job>> = BTreeMap::new();
                for job in std::mem::take(&mut state.pending) {
                    let c = job.config(&base);
                    by.entry((c.model.to_string(), c.epochs))
                        .or_default()
                        .push(job);
                }
                for jobs in by.into_values() {
                    let group = base.fuse_group_on(state.args.trainer.device.is_cuda());
                    for chunk in jobs.chunks(group) {
                        match chunk {
                            [job] => train_alone(&myself, state, job.clone()).await?,
                            _ => train_fused(&myself, state, chunk.to_vec()),
                        }
                    }
                }
            }
            PoolMsg::Progress {
                job,
                progress: p,
                snapshot,
            } => {
                if state.args.trainer.leases.check(&job.id, job.epoch).is_err() {
                    return Ok(());
                }
                let msg = JobProgress {
                    node: state.args.node.clone(),
                    job_id: job.id.clone(),
                    epoch: job.epoch,
                    train_epoch: p.epoch as u32,
                    epochs: p.epochs as u32,
                    train_loss: p.train_loss,
                    val_loss: p.val_loss,
                    snapshot_key: snapshot.unwrap_or_default(),
                };
                match state.args.scope.coordinator() {
                    Ok(c) => {
                        if let Err(e) = c.cast(CoordinatorPortMsg::Progress(msg.into())) {
                            warn!(error = %e, "progress report failed");
                        }
                    }
                    Err(e) => warn!(error = %e, "progress report failed"),
                }
            }
            PoolMsg::Finished { job, outcome } => {
                state.fusing.remove(&(job.ticker.clone(), job.interval));
                if let Some((_, running)) =
                    state.trainers.get_mut(&(job.ticker.clone(), job.interval))
                {
                    *running = None;
                }
                let leases = state.args.trainer.leases.clone();
                if let Err(why) = leases.check(&job.id, job.epoch) {
                    warn!(job = %job.id, reason = %why, "job fenced off; nothing is reported");
                    leases.release(&job.id);
                    return Ok(());
                }
                let report = match outcome {
                    Ok(o) => CheckpointReport {
                        node: state.args.node.clone(),
                        ticker: job.ticker.clone(),
                        interval: job.interval.to_string(),
                        epoch: job.epoch,
                        version: job.version,
                        metrics_json: o.metrics_json()?,
                        uri: o.uri,
                        sha256: o.digest,
                        kind: o.kind.to_string(),
                        job_id: job.id.clone(),
                    },
                    Err(e) => {
                        error!(ticker = %job.ticker, interval = %job.interval, job = %job.id, error = %e, "training failed");
                        report_failure(state, &job, e);
                        return Ok(());
                    }
                };
                let store = state.args.trainer.store.clone();
                let scope = state.args.scope.clone();
                tokio::spawn(async move {
                    let (ticker, interval) = (report.ticker.clone(), report.interval.clone());
                    let r = with_retries("checkpoint report", || {
                        let (r, scope) = (report.clone(), scope.clone());
                        async move {
                            scope
                                .ask(
                                    "checkpoint report",
                                    |reply| CoordinatorPortMsg::Checkpoint(r.into(), reply),
                                    REPORT_TIMEOUT,
                                )
                                .await
                        }
                    })
                    .await;
                    leases.release(&job.id);
                    match r {
                        Some(ack) if ack.accepted => {
                            info!(%ticker, %interval, version = report.version, "checkpoint accepted");
                            remove_snapshots(&store, &job).await;
                        }
                        Some(ack) => {
                            warn!(%ticker, %interval, reason = %ack.reason, "checkpoint refused")
                        }
                        None => {}
                    }
                });
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some((id, why)) = tickmesh_io::supervision::stopped_child(&evt) {
            if id == state.port.get_id() {
                return Err(format!("the pool's mesh port stopped: {why}").into());
            }
        }
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            error!(error = %err, "trainer crashed; it is respawned on its next job");
            let key = state
                .trainers
                .iter()
                .find(|(_, (t, _))| t.get_id() == cell.get_id())
                .map(|(k, _)| k.clone());
            if let Some((_, Some(job))) = key.and_then(|k| state.trainers.remove(&k)) {
                report_failure(state, &job, format!("the trainer crashed: {err}"));
            }
        }
        Ok(())
    }
}

/// Hands a job to the `TrainerActor` of its series (spawned on first use).
async fn train_alone(
    myself: &ActorRef<PoolMsg>,
    state: &mut TrainerPoolState,
    job: Job,
) -> Result<(), ActorProcessingErr> {
    let key = (job.ticker.clone(), job.interval);
    let trainer = match state.trainers.get(&key) {
        Some((t, _)) => t.clone(),
        None => {
            let (t, _) = Actor::spawn_linked(
                None,
                TrainerActor,
                state.args.trainer.clone(),
                myself.get_cell(),
            )
            .await?;
            t
        }
    };
    state
        .trainers
        .insert(key, (trainer.clone(), Some(job.clone())));
    trainer.cast(TrainerMsg::Train {
        job,
        pool: myself.clone(),
    })?;
    Ok(())
}

/// Trains `jobs` as one fused computation ([`train_group`]) in a task that
/// holds one of the node's training slots; each job's progress and outcome
/// come back as the pool's messages, as a lone trainer's do. A panic of the
/// group fails all its jobs (they are retried).
fn train_fused(myself: &ActorRef<PoolMsg>, state: &mut TrainerPoolState, jobs: Vec<Job>) {
    for j in &jobs {
        state.fusing.insert((j.ticker.clone(), j.interval));
    }
    info!(jobs = jobs.len(), tickers = ?jobs.iter().map(|j| j.ticker.as_str()).collect::<Vec<_>>(), "training a fused group");
    let args = state.args.trainer.clone();
    let me = myself.clone();
    let task = tokio::spawn(async move {
        let Ok(_slot) = args.slots.clone().acquire_owned().await else {
            return;
        };
        let epochs = jobs
            .first()
            .map(|j| j.config(&args.train).epochs)
            .unwrap_or(0);
        for job in &jobs {
            let _ = me.cast(PoolMsg::Progress {
                job: job.clone(),
                progress: EpochProgress {
                    epoch: 0,
                    epochs,
                    train_loss: 0.0,
                    val_loss: 0.0,
                    best_epoch: 0,
                },
                snapshot: None,
            });
        }
        let run = {
            let (args, jobs, me) = (args.clone(), jobs.clone(), me.clone());
            tokio::spawn(async move {
                train_group(&args, &jobs, move |job, progress, snapshot| {
                    let _ = me.cast(PoolMsg::Progress {
                        job: job.clone(),
                        progress,
                        snapshot,
                    });
                })
                .await
            })
        };
        match run.await {
            Ok(outcomes) => {
                for (job, o) in jobs.into_iter().zip(outcomes) {
                    let outcome = o.map(Box::new).map_err(|e| e.to_string());
                    let _ = me.cast(PoolMsg::Finished { job, outcome });
                }
            }
            Err(e) => {
                for job in jobs {
                    let outcome = Err(format!("the fused trainer crashed: {e}"));
                    let _ = me.cast(PoolMsg::Finished { job, outcome });
                }
            }
        }
    });
    state.tasks.0.retain(|t| !t.is_finished());
    state.tasks.0.push(task);
}

/// Removes a done job's snapshots (all attempts).
async fn remove_snapshots(store: &tickmesh_io::store::SharedStore, job: &Job) {
    let prefix = job_runs_prefix(job);
    match store.list(buckets::MODELS, &prefix).await {
        Ok(keys) => {
            for k in keys {
                if let Err(e) = store.delete(buckets::MODELS, &k).await {
                    warn!(key = %k, error = %e, "snapshot left behind");
                }
            }
        }
        Err(e) => warn!(%prefix, error = %e, "cannot list the job's snapshots; left behind"),
    }
}

/// Calls the coordinator up to 5 times with backoff (0.5 s doubling);
/// `None` (and an error logged) when every try failed: the coordinator then
/// reassigns the job when its lease runs out.
async fn with_retries<F, Fut>(what: &str, mut call: F) -> Option<CheckpointAck>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<CheckpointAck, String>>,
{
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=5 {
        match call().await {
            Ok(r) => return Some(r),
            Err(e) if attempt == 5 => {
                error!(error = %e, "{what} failed {attempt} times; the coordinator's lease will reassign the job");
            }
            Err(e) => {
                warn!(error = %e, attempt, "{what} failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
    None
}

/// Tells the coordinator a job failed, so it is retried or marked failed
/// (in the background, with retries: the pool never stops on a failed call).
fn report_failure(state: &TrainerPoolState, job: &Job, reason: String) {
    let failure = JobFailure {
        node: state.args.node.clone(),
        ticker: job.ticker.clone(),
        interval: job.interval.to_string(),
        epoch: job.epoch,
        version: job.version,
        job_id: job.id.clone(),
        reason,
    };
    let leases = state.args.trainer.leases.clone();
    let id = job.id.clone();
    let scope = state.args.scope.clone();
    tokio::spawn(async move {
        let ack = with_retries("failure report", || {
            let (f, scope) = (failure.clone(), scope.clone());
            async move {
                scope
                    .ask(
                        "failure report",
                        |reply| CoordinatorPortMsg::Failure(f.into(), reply),
                        REPORT_TIMEOUT,
                    )
                    .await
            }
        })
        .await;
        leases.release(&id);
        if let Some(ack) = ack.filter(|a| !a.accepted) {
            warn!(ticker = %failure.ticker, interval = %failure.interval, reason = %ack.reason, "failure report refused");
        }
    });
}
