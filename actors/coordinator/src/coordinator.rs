//! `CoordinatorActor`: receives node registrations, heartbeats, start
//! signals, progress, checkpoint and failure reports (from the gRPC service
//! and the `start_model` consumer). Each start request becomes one job per
//! ticker with an id (`GetJob` reports its state: queued, running with the
//! last epoch's losses, done with the version and metrics, failed with the
//! reason). It assigns each job to one trainer node (GPU nodes first, then
//! the least loaded) under a new epoch; a job whose (ticker, interval) is
//! already being trained waits without holding up the jobs behind it. It
//! records checkpoints as champions in `model_versions` and pushes each new
//! version to every predictor watching. A report stamped with an epoch other
//! than the job's current one is refused; a failure report ends the job and
//! frees its node. A node whose heartbeats stop for
//! `lease_secs` is dropped and its jobs are reassigned with a higher epoch.
//! It supervises its `StartModelConsumer`: a consumer that fails (the bus is
//! down) is restarted after a backoff while the restart budget lasts; then
//! the coordinator stops, and its node exits non-zero.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::Utc;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tickmesh_core::bus::{BusConfig, SharedPublisher};
use tickmesh_core::config::ModelKind;
use tickmesh_core::db::{Db, ModelVersion};
use tickmesh_core::supervision::{stopped_child, RestartBudget};
use tickmesh_core::types::Interval;
use tickmesh_proto::v1::{
    Assignment, CheckpointAck, CheckpointReport, JobFailure, JobProgress, JobStatus, ModelUpdate,
};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{error, info, warn};

use crate::start_consumer::{StartConsumerArgs, StartModelConsumer};

pub type AssignmentTx = mpsc::Sender<Result<Assignment, Status>>;
pub type ModelTx = mpsc::Sender<Result<ModelUpdate, Status>>;

pub struct CoordinatorActor;

/// Messages of [`CoordinatorActor`].
pub enum CoordinatorMsg {
    /// A node announces itself.
    Register {
        node: String,
        roles: Vec<String>,
        cpus: u32,
        gpus: u32,
    },
    /// A node is alive.
    Heartbeat { node: String },
    /// A trainer node opens its assignment stream.
    WatchAssignments { node: String, tx: AssignmentTx },
    /// A predictor opens its model stream; champions are sent at once.
    WatchModels { tx: ModelTx },
    /// Train these tickers on this interval (with optional overrides of
    /// the trainers' config); replies with the job ids and the refusals.
    Start {
        tickers: Vec<String>,
        interval: Interval,
        model: Option<ModelKind>,
        epochs: Option<usize>,
        reply: Option<RpcReplyPort<Started>>,
    },
    /// A trainer reports a checkpoint.
    Report {
        report: CheckpointReport,
        reply: RpcReplyPort<CheckpointAck>,
    },
    /// A trainer finished a training epoch of a job.
    Progress(JobProgress),
    /// A trainer could not finish a job.
    Failure {
        failure: JobFailure,
        reply: RpcReplyPort<CheckpointAck>,
    },
    /// The state of a job; `None` for an unknown id.
    GetJob {
        id: String,
        reply: RpcReplyPort<Option<JobStatus>>,
    },
    /// Check leases (sent to itself every heartbeat period).
    Tick,
}

impl ractor::Message for CoordinatorMsg {}

/// What a start request did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Started {
    /// Jobs newly queued.
    pub queued: u32,
    /// One id per accepted ticker (an identical queued job's id is reused).
    pub job_ids: Vec<String>,
    /// `TICKER: reason` per refused ticker.
    pub refused: Vec<String>,
}

/// Jobs waiting at most; a start request beyond it is refused.
const MAX_PENDING: usize = 10_000;
/// Finished jobs remembered for `GetJob`.
const MAX_FINISHED: usize = 10_000;

#[derive(Clone)]
pub struct CoordinatorArgs {
    pub db: Db,
    pub heartbeat: Duration,
    pub lease: Duration,
    /// Where `start_model` comes from; `None` runs without a consumer.
    pub intake: Option<(BusConfig, SharedPublisher)>,
    pub budget: RestartBudget,
}

struct Node {
    gpus: u32,
    roles: Vec<String>,
    last_seen: Instant,
    assignments: Option<AssignmentTx>,
    load: usize,
}

#[derive(Debug, Clone)]
struct ActiveJob {
    job: String,
    node: String,
    epoch: i64,
    version: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

impl JobState {
    fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone)]
struct JobRecord {
    ticker: String,
    interval: Interval,
    model: Option<ModelKind>,
    epochs: Option<usize>,
    state: JobState,
    status: JobStatus,
}

impl JobRecord {
    fn set(&mut self, state: JobState) {
        self.state = state;
        self.status.state = state.as_str().into();
    }
}

pub struct CoordinatorState {
    args: CoordinatorArgs,
    consumer: Option<ActorCell>,
    nodes: HashMap<String, Node>,
    /// Queued job ids, oldest first.
    pending: VecDeque<String>,
    active: HashMap<(String, Interval), ActiveJob>,
    jobs: HashMap<String, JobRecord>,
    finished: VecDeque<String>,
    watchers: Vec<ModelTx>,
}

impl Actor for CoordinatorActor {
    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some((child, why)) = stopped_child(&evt) else {
            return Ok(());
        };
        if st.consumer.as_ref().map(|c| c.get_id()) != Some(child) {
            return Ok(());
        }
        let Some(backoff) = st.args.budget.allow() else {
            error!(reason = %why, "start_model consumer failed too often; the coordinator stops");
            myself.stop(Some(format!(
                "start_model consumer failed too often: {why}"
            )));
            return Ok(());
        };
        warn!(reason = %why, backoff_ms = backoff.as_millis() as u64, "start_model consumer failed, restarting");
        tokio::time::sleep(backoff).await;
        st.consumer = spawn_consumer(&myself, &st.args).await?;
        Ok(())
    }

    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: CoordinatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(args.heartbeat, || CoordinatorMsg::Tick);
        let consumer = spawn_consumer(&myself, &args).await?;
        Ok(CoordinatorState {
            args,
            consumer,
            nodes: HashMap::new(),
            pending: VecDeque::new(),
            active: HashMap::new(),
            jobs: HashMap::new(),
            finished: VecDeque::new(),
            watchers: Vec::new(),
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CoordinatorMsg::Register {
                node,
                roles,
                cpus,
                gpus,
            } => {
                info!(%node, ?roles, cpus, gpus, "node registered");
                // A node that registers again restarted: what it was running is lost.
                requeue_jobs_of(st, &node, "registered again (restarted)");
                st.nodes.insert(
                    node,
                    Node {
                        gpus,
                        roles,
                        last_seen: Instant::now(),
                        assignments: None,
                        load: 0,
                    },
                );
            }
            CoordinatorMsg::Heartbeat { node } => {
                if let Some(n) = st.nodes.get_mut(&node) {
                    n.last_seen = Instant::now();
                }
            }
            CoordinatorMsg::WatchAssignments { node, tx } => {
                let n = st.nodes.entry(node.clone()).or_insert_with(|| Node {
                    gpus: 0,
                    roles: vec!["train".into()],
                    last_seen: Instant::now(),
                    assignments: None,
                    load: 0,
                });
                n.assignments = Some(tx);
                n.last_seen = Instant::now();
                info!(%node, "trainer watching assignments");
                assign_pending(st).await?;
            }
            CoordinatorMsg::WatchModels { tx } => {
                match st.args.db.champions().await {
                    Ok(champions) => {
                        for m in champions {
                            let _ = tx.send(Ok(update_of(&m))).await;
                        }
                    }
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!("model registry: {e}"))))
                            .await;
                        return Ok(());
                    }
                }
                st.watchers.push(tx);
            }
            CoordinatorMsg::Start {
                tickers,
                interval,
                model,
                epochs,
                reply,
            } => {
                let started = start_jobs(st, tickers, interval, model, epochs).await;
                info!(%interval, queued = started.queued, refused = started.refused.len(), "training requested");
                assign_pending(st).await?;
                if let Some(r) = reply {
                    let _ = r.send(started);
                }
            }
            CoordinatorMsg::Progress(p) => {
                let current = st
                    .active
                    .values()
                    .any(|a| a.job == p.job_id && a.epoch == p.epoch && a.node == p.node);
                if let Some(j) = st.jobs.get_mut(&p.job_id).filter(|_| current) {
                    // Epoch 0: the trainer took a slot and started.
                    if j.state == JobState::Queued {
                        j.set(JobState::Running);
                    }
                    j.status.train_epoch = p.train_epoch;
                    j.status.epochs = p.epochs;
                    j.status.train_loss = p.train_loss;
                    j.status.val_loss = p.val_loss;
                }
            }
            CoordinatorMsg::Failure { failure, reply } => {
                let _ = reply.send(ack(fail_job(st, failure)));
                assign_pending(st).await?;
            }
            CoordinatorMsg::GetJob { id, reply } => {
                let _ = reply.send(st.jobs.get(&id).map(|j| j.status.clone()));
            }
            CoordinatorMsg::Report { report, reply } => {
                let _ = reply.send(ack(accept_report(st, report).await));
                assign_pending(st).await?;
            }
            CoordinatorMsg::Tick => {
                let lease = st.args.lease;
                let lost: Vec<String> = st
                    .nodes
                    .iter()
                    .filter(|(_, n)| n.last_seen.elapsed() > lease)
                    .map(|(k, _)| k.clone())
                    .collect();
                for node in lost {
                    st.nodes.remove(&node);
                    requeue_jobs_of(st, &node, "lost (no heartbeat within the lease)");
                }
                st.watchers.retain(|w| !w.is_closed());
                assign_pending(st).await?;
            }
        }
        Ok(())
    }
}

async fn spawn_consumer(
    myself: &ActorRef<CoordinatorMsg>,
    args: &CoordinatorArgs,
) -> Result<Option<ActorCell>, ActorProcessingErr> {
    let Some((bus, publisher)) = args.intake.clone() else {
        return Ok(None);
    };
    let ca = StartConsumerArgs {
        bus,
        publisher,
        coordinator: myself.clone(),
    };
    let (c, _) = Actor::spawn_linked(None, StartModelConsumer, ca, myself.get_cell()).await?;
    Ok(Some(c.get_cell()))
}

/// The answer to a report: accepted, or refused with the reason.
fn ack(r: Result<(), String>) -> CheckpointAck {
    match r {
        Ok(()) => CheckpointAck {
            accepted: true,
            reason: String::new(),
        },
        Err(reason) => CheckpointAck {
            accepted: false,
            reason,
        },
    }
}

fn update_of(m: &ModelVersion) -> ModelUpdate {
    ModelUpdate {
        ticker: m.ticker.clone(),
        interval: m.interval.to_string(),
        version: m.version,
        uri: m.uri.clone(),
        sha256: m.sha256.clone(),
        kind: m.kind.clone(),
    }
}

/// Queues one job per ticker that has aggregated data.
async fn start_jobs(
    st: &mut CoordinatorState,
    tickers: Vec<String>,
    interval: Interval,
    model: Option<ModelKind>,
    epochs: Option<usize>,
) -> Started {
    let mut out = Started::default();
    for ticker in tickers {
        let same = st.pending.iter().find(|id| {
            st.jobs.get(*id).is_some_and(|j| {
                j.ticker == ticker
                    && j.interval == interval
                    && j.model == model
                    && j.epochs == epochs
            })
        });
        if let Some(id) = same {
            out.job_ids.push(id.clone());
            continue;
        }
        if st.pending.len() >= MAX_PENDING {
            out.refused.push(format!(
                "{ticker}: the queue is full ({MAX_PENDING} jobs waiting)"
            ));
            continue;
        }
        match st.args.db.count_aggregated(&ticker, interval).await {
            Ok(0) => {
                out.refused.push(format!(
                    "{ticker}: unknown ticker: no aggregated_data rows for interval {interval}"
                ));
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                out.refused
                    .push(format!("{ticker}: the database is unavailable: {e}"));
                continue;
            }
        }
        let id = format!(
            "{ticker}-{interval}-{:x}-{:04x}",
            Utc::now().timestamp_micros(),
            rand::random::<u16>()
        );
        st.jobs.insert(
            id.clone(),
            JobRecord {
                ticker: ticker.clone(),
                interval,
                model,
                epochs,
                state: JobState::Queued,
                status: JobStatus {
                    job_id: id.clone(),
                    ticker,
                    interval: interval.to_string(),
                    state: JobState::Queued.as_str().into(),
                    model: model.map(|m| m.to_string()).unwrap_or_default(),
                    epochs: epochs.unwrap_or(0) as u32,
                    ..Default::default()
                },
            },
        );
        st.pending.push_back(id.clone());
        out.job_ids.push(id);
        out.queued += 1;
    }
    out
}

/// Marks a job finished and forgets the oldest finished ones beyond the cap.
fn finish(st: &mut CoordinatorState, id: &str, state: JobState) {
    if let Some(j) = st.jobs.get_mut(id) {
        j.set(state);
        st.finished.push_back(id.to_string());
    }
    while st.finished.len() > MAX_FINISHED {
        if let Some(old) = st.finished.pop_front() {
            st.jobs.remove(&old);
        }
    }
}

/// Hands pending jobs to trainer nodes while any can take one. A job whose
/// (ticker, interval) is being trained stays queued; the jobs behind it go on.
async fn assign_pending(st: &mut CoordinatorState) -> Result<(), ActorProcessingErr> {
    let mut i = 0;
    while i < st.pending.len() {
        let id = st.pending[i].clone();
        let Some(job) = st.jobs.get(&id).cloned() else {
            st.pending.remove(i);
            continue;
        };
        let (ticker, interval) = (job.ticker.clone(), job.interval);
        if st.active.contains_key(&(ticker.clone(), interval)) {
            i += 1;
            continue;
        }
        let best = st
            .nodes
            .iter()
            .filter(|(_, n)| n.assignments.as_ref().is_some_and(|tx| !tx.is_closed()))
            .filter(|(_, n)| n.roles.iter().any(|r| r == "train"))
            .min_by_key(|(name, n)| (n.gpus == 0, n.load, (*name).clone()))
            .map(|(name, _)| name.clone());
        let Some(node) = best else { break };
        // The database first: a failure leaves the job queued (retried on the next tick).
        let fenced = async {
            let epoch = st.args.db.assignment_epoch(&ticker, interval).await? + 1;
            let version = st.args.db.next_model_version(&ticker, interval).await?;
            let lease_until =
                Utc::now() + chrono::Duration::from_std(st.args.lease).unwrap_or_default();
            st.args
                .db
                .upsert_assignment(&ticker, interval, &node, epoch, lease_until)
                .await?;
            Ok::<_, tickmesh_core::Error>((epoch, version))
        }
        .await;
        let (epoch, version) = match fenced {
            Ok(v) => v,
            Err(e) => {
                error!(%ticker, %interval, job = %id, error = %e, "cannot record the assignment; the job stays queued");
                break;
            }
        };
        let n = st.nodes.get_mut(&node).expect("chosen node exists");
        let tx = n.assignments.clone().expect("chosen node watches");
        let a = Assignment {
            ticker: ticker.clone(),
            interval: interval.to_string(),
            epoch,
            version,
            job_id: id.clone(),
            model: job.model.map(|m| m.to_string()).unwrap_or_default(),
            epochs: job.epochs.unwrap_or(0) as u32,
        };
        // Never wait on a node's stream inside the actor: a full or closed
        // stream leaves the job queued for the next tick.
        match tx.try_send(Ok(a)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => {
                n.assignments = None;
                continue;
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(%node, "assignment stream full; the job waits");
                break;
            }
        }
        n.load += 1;
        st.pending.remove(i);
        info!(%ticker, %interval, %node, epoch, version, job = %id, "job assigned");
        // Running once the trainer reports that it started (progress, epoch 0).
        if let Some(j) = st.jobs.get_mut(&id) {
            j.status.node = node.clone();
            j.status.version = version;
        }
        st.active.insert(
            (ticker, interval),
            ActiveJob {
                job: id,
                node,
                epoch,
                version,
            },
        );
    }
    Ok(())
}

/// Puts the active jobs of `node` back in the queue (they get a new epoch
/// when assigned again, so a late report from the old assignment is refused).
fn requeue_jobs_of(st: &mut CoordinatorState, node: &str, why: &str) {
    let keys: Vec<_> = st
        .active
        .iter()
        .filter(|(_, j)| j.node == node)
        .map(|(k, _)| k.clone())
        .collect();
    for k in keys {
        if let Some(a) = st.active.remove(&k) {
            warn!(%node, ticker = %k.0, interval = %k.1, job = %a.job, "node {why}; job requeued");
            if let Some(j) = st.jobs.get_mut(&a.job) {
                j.set(JobState::Queued);
                j.status.node.clear();
            }
            st.pending.push_front(a.job);
        }
    }
}

/// Ends an active job as failed (the report must come from its current assignment).
fn fail_job(st: &mut CoordinatorState, f: JobFailure) -> Result<(), String> {
    let interval: Interval = f
        .interval
        .parse()
        .map_err(|e: tickmesh_core::Error| e.to_string())?;
    let key = (f.ticker.clone(), interval);
    let job = st
        .active
        .get(&key)
        .cloned()
        .ok_or_else(|| format!("no active job for {} {interval}", f.ticker))?;
    if job.epoch != f.epoch || job.node != f.node || job.job != f.job_id {
        return Err(format!(
            "stale failure report for {} {interval}: epoch {} from {} (current: epoch {} on {})",
            f.ticker, f.epoch, f.node, job.epoch, job.node
        ));
    }
    st.active.remove(&key);
    if let Some(n) = st.nodes.get_mut(&f.node) {
        n.load = n.load.saturating_sub(1);
    }
    warn!(ticker = %f.ticker, %interval, job = %f.job_id, reason = %f.reason, "job failed");
    if let Some(j) = st.jobs.get_mut(&job.job) {
        j.status.reason = f.reason;
    }
    finish(st, &job.job, JobState::Failed);
    Ok(())
}

async fn accept_report(st: &mut CoordinatorState, r: CheckpointReport) -> Result<(), String> {
    let interval: Interval = r
        .interval
        .parse()
        .map_err(|e: tickmesh_core::Error| e.to_string())?;
    let key = (r.ticker.clone(), interval);
    let job = st
        .active
        .get(&key)
        .cloned()
        .ok_or_else(|| format!("no active job for {} {interval}", r.ticker))?;
    if job.epoch != r.epoch
        || job.node != r.node
        || job.version != r.version
        || (!r.job_id.is_empty() && job.job != r.job_id)
    {
        return Err(format!(
            "stale report for {} {interval}: epoch {} from {} (current: epoch {} on {})",
            r.ticker, r.epoch, r.node, job.epoch, job.node
        ));
    }
    let m = ModelVersion {
        ticker: r.ticker.clone(),
        interval,
        version: r.version,
        kind: r.kind.clone(),
        uri: r.uri.clone(),
        sha256: r.sha256.clone(),
        metrics: r.metrics_json.clone(),
        status: "champion".into(),
        created_at: Utc::now(),
    };
    if let Err(e) = st.args.db.insert_model_version(&m).await {
        // End the job rather than leave it active with nothing to report it.
        let reason = format!("the model registry refused version {}: {e}", r.version);
        st.active.remove(&key);
        if let Some(n) = st.nodes.get_mut(&r.node) {
            n.load = n.load.saturating_sub(1);
        }
        if let Some(j) = st.jobs.get_mut(&job.job) {
            j.status.reason = reason.clone();
        }
        finish(st, &job.job, JobState::Failed);
        return Err(reason);
    }
    st.active.remove(&key);
    if let Some(n) = st.nodes.get_mut(&r.node) {
        n.load = n.load.saturating_sub(1);
    }
    if let Some(j) = st.jobs.get_mut(&job.job) {
        j.status.metrics_json = r.metrics_json.clone();
        j.status.model = r.kind.clone();
    }
    finish(st, &job.job, JobState::Done);
    info!(ticker = %r.ticker, %interval, version = r.version, "model version registered as champion");
    let update = update_of(&m);
    let mut live = Vec::with_capacity(st.watchers.len());
    for w in st.watchers.drain(..) {
        if w.send(Ok(update.clone())).await.is_ok() {
            live.push(w);
        }
    }
    st.watchers = live;
    Ok(())
}
