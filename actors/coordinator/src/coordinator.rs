//! `CoordinatorActor`: receives node registrations and heartbeats,
//! progress, checkpoint and failure reports (from its mesh port, see
//! [`crate::port`]), start requests (Admin and the `start_model` consumer)
//! and the mesh's membership changes of the `trainers` and `predictors`
//! groups; sends assignments to trainer pools' ports and model versions to
//! predictors' ports, as ractor_cluster messages.
//!
//! Jobs live in the database (`jobs`, see [`JobRow`]) and are written there
//! before anything acts on them, so a restarted coordinator reloads every
//! queued and assigned job:
//!
//! - **Start.** One job per ticker with aggregated data; a request for a
//!   (ticker, interval) that already has a queued or assigned job gets that
//!   job's id (requests coalesce). At most `max_open_jobs` are open.
//! - **Assignment.** A queued job whose backoff has passed goes to the
//!   trainer node with the most free slots (GPU nodes first) under the next
//!   assignment epoch of its (ticker, interval) and a version that no other
//!   attempt has used, so each attempt writes its own checkpoint key. A job
//!   never waits behind another: each (ticker, interval) has one open job.
//! - **Leases.** An assignment holds a lease of `lease_secs`; the trainer's
//!   heartbeat renews the leases of the jobs it still holds and is told which
//!   ones are no longer its own (revoked). A lease that runs out, a failure
//!   report, or a node that comes back without the job ends the attempt: the
//!   job is queued again while attempts remain (`max_attempts`), then marked
//!   failed with the reason. A job that failed waits a jittered, doubling
//!   backoff first; one whose node went away is queued at once. The next
//!   attempt resumes from the job's last snapshot.
//! - **Operators** (the Admin API): cordoned and draining nodes get nothing
//!   new; a drain publishes NOT_SERVING for the node first; promote and
//!   rollback change the champion and push it to the predictors.
//! - **Fencing.** Progress, checkpoint and failure reports must name the
//!   job's current node, epoch (and version); anything else is refused. A
//!   node name is held by one process (its incarnation) while it is alive.
//! - **Membership.** A trainer node is assignable while its pool's port is
//!   in the mesh's `trainers` group: when its mesh session ends the port
//!   leaves, and the node is lost at once (nothing new goes to it; its jobs
//!   move when their leases run out, since a cut-off node may still be
//!   training). A node that stops heartbeating is lost after one lease too.
//! - **Models.** An accepted checkpoint is registered as champion in
//!   `model_versions` and cast to every port in the `predictors` group; a
//!   predictor port that joins (a node that starts or reconnects), and every
//!   one present when the coordinator (re)starts, is sent every champion.
//!   Casts never wait on the receiver.
//!
//! It supervises its `StartModelConsumer`: a failed consumer is restarted
//! after a backoff (a timer, never a sleep in the handler) while the restart
//! budget lasts; then the coordinator stops, and its node exits non-zero.
//! Its mesh port is its child too: if the port dies, so does the coordinator
//! (and its supervisor starts both again).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use chrono::Utc;
use ractor::pg::GroupChangeMessage;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tickmesh_core::config::{ModelKind, PromotionConfig, RetrainConfig};
use tickmesh_core::types::{model_prefix, Interval};
use tickmesh_io::bus::{BusConfig, SharedPublisher};
use tickmesh_io::db::{Db, JobRow, ModelVersion};
use tickmesh_io::supervision::{stopped_child, RestartBudget};
use tickmesh_proto::mesh::{
    self, Assignment, CheckpointAck, CheckpointReport, JobFailure, JobProgress, ModelUpdate,
    PredictorPortMsg, TrainerPortMsg, PREDICTORS, TRAINERS,
};
use tickmesh_proto::v1::{JobStatus, NodeInfo};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tracing::{error, info, warn};

use crate::gate;
use crate::port::{CoordinatorPort, PortArgs};
use crate::start_consumer::{StartConsumerArgs, StartModelConsumer};

#[derive(Clone, Copy)]
pub struct CoordinatorActor;

/// A node's registration.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub node: String,
    pub roles: Vec<String>,
    pub cpus: u32,
    pub gpus: u32,
    /// Training jobs it runs at once.
    pub slots: u32,
    /// Random per process start.
    pub incarnation: u64,
    /// `(job id, epoch)` of the jobs it still runs (after a reconnect).
    pub running: Vec<(String, i64)>,
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeartbeatOutcome {
    /// False: register again (the coordinator does not know this node).
    pub registered: bool,
    /// Held jobs that are not this node's any more.
    pub revoked: Vec<String>,
    /// `cordoned` or `draining` when an operator said so; empty otherwise.
    pub admin_state: String,
}

/// Messages of [`CoordinatorActor`].
pub enum CoordinatorMsg {
    /// A node announces itself; refused while a live process holds the name.
    Register {
        reg: Registration,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// A node is alive and asks to renew the leases of the jobs it holds.
    Heartbeat {
        node: String,
        incarnation: u64,
        held: Vec<(String, i64)>,
        reply: RpcReplyPort<Result<HeartbeatOutcome, String>>,
    },
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
    /// A trainer finished a training epoch of a job (and maybe saved a snapshot).
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
    /// Check leases and assign (sent to itself every heartbeat period).
    Tick,
    /// Start the `start_model` consumer again (a timer sends it after the backoff).
    RestartConsumer,
    /// The trainer nodes known (connected, or with an operator's state).
    ListNodes(RpcReplyPort<Vec<NodeInfo>>),
    /// An operator cordons, drains or readies a node.
    SetNodeState {
        node: String,
        state: AdminState,
        reply: RpcReplyPort<Result<NodeInfo, String>>,
    },
    /// An operator promotes a version (`Some`) or rolls back (`None`); the
    /// new champion goes to every predictor watching.
    ChangeChampion {
        ticker: String,
        interval: Interval,
        version: Option<i64>,
        reply: RpcReplyPort<tickmesh_core::Result<ModelVersion>>,
    },
}

/// What an operator made of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// Assignable (uncordon).
    Ready,
    /// Nothing new assigned; running jobs go on.
    Cordoned,
    /// NOT_SERVING, nothing new assigned; running jobs finish, or with
    /// `handoff` move to other nodes at once (resuming from their snapshots).
    Draining { handoff: bool },
}

impl AdminState {
    fn stored(self) -> Option<&'static str> {
        match self {
            AdminState::Ready => None,
            AdminState::Cordoned => Some("cordoned"),
            AdminState::Draining { .. } => Some("draining"),
        }
    }
}

/// The health service name under which a node's state is published.
pub fn node_health_name(node: &str) -> String {
    format!("tickmesh.node.{node}")
}

impl ractor::Message for CoordinatorMsg {}

/// What a start request did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Started {
    /// Jobs newly queued.
    pub queued: u32,
    /// One id per accepted ticker (an open job of the same ticker-interval is reused).
    pub job_ids: Vec<String>,
    /// `TICKER: reason` per refused ticker.
    pub refused: Vec<String>,
    /// The database could not be reached: nothing was decided, ask again later.
    pub unavailable: bool,
}

/// Finished jobs kept in memory for `GetJob` (older ones are read from the database).
const MAX_FINISHED: usize = 10_000;

#[derive(Clone)]
pub struct CoordinatorArgs {
    pub db: Db,
    pub heartbeat: Duration,
    pub lease: Duration,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    pub max_open_jobs: usize,
    /// Which trained versions become champion (`[promotion]`, [`crate::gate`]).
    pub promotion: PromotionConfig,
    /// When champions are retrained on their own (`[retrain]`).
    pub retrain: RetrainConfig,
    /// Where `start_model` comes from; `None` runs without a consumer.
    pub intake: Option<(BusConfig, SharedPublisher)>,
    pub budget: RestartBudget,
    /// Where each trainer node's health is published (SERVING while it
    /// takes work; NOT_SERVING when drained or lost).
    pub health: Option<HealthReporter>,
    /// The cluster's namespace on the mesh: the coordinator's port is
    /// registered in it, and its groups are watched.
    pub scope: mesh::Scope,
}

struct Node {
    cpus: u32,
    gpus: u32,
    slots: usize,
    roles: Vec<String>,
    incarnation: u64,
    last_seen: Instant,
    /// Its trainer pool's mesh port, while in the `trainers` group.
    port: Option<ActorRef<TrainerPortMsg>>,
    /// Open jobs assigned to it.
    running: HashSet<String>,
}

impl Node {
    fn free(&self) -> usize {
        self.slots.saturating_sub(self.running.len())
    }

    fn can_take(&self) -> bool {
        self.roles.iter().any(|r| r == "train")
            && self.free() > 0
            && self
                .port
                .as_ref()
                .is_some_and(|p| p.get_status() == ractor::ActorStatus::Running)
    }
}

struct Job {
    row: JobRow,
    /// The current attempt's last progress (the trainer started when set).
    progress: Option<JobProgress>,
    /// When the current assignment was made or adopted.
    since: Instant,
}

pub struct CoordinatorState {
    args: CoordinatorArgs,
    consumer: Option<ActorCell>,
    port: Option<ActorCell>,
    nodes: HashMap<String, Node>,
    jobs: HashMap<String, Job>,
    /// The open (queued or assigned) job of each ticker-interval.
    open: HashMap<(String, Interval), String>,
    /// Queued job ids, in the order they were queued.
    queue: VecDeque<String>,
    finished: VecDeque<String>,
    /// Operators' node states (`cordoned`, `draining`), kept in the database.
    admin: HashMap<String, String>,
    /// When the retrain policy last looked.
    retrain_looked: Option<Instant>,
}

impl Actor for CoordinatorActor {
    type Msg = CoordinatorMsg;
    type State = CoordinatorState;
    type Arguments = CoordinatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: CoordinatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let rows = args
            .db
            .jobs(&["queued", "assigned"], args.max_open_jobs as i64 * 2)
            .await?;
        let mut st = CoordinatorState {
            args,
            consumer: None,
            port: None,
            nodes: HashMap::new(),
            jobs: HashMap::new(),
            open: HashMap::new(),
            queue: VecDeque::new(),
            finished: VecDeque::new(),
            admin: HashMap::new(),
            retrain_looked: None,
        };
        st.admin = st.args.db.node_states().await?.into_iter().collect();
        // Leases of reloaded assignments get a fresh term: their trainers
        // could not renew while the coordinator was down.
        let grace = Utc::now() + chrono_of(st.args.lease);
        let (mut queued, mut assigned) = (0, 0);
        for mut row in rows {
            if row.state == "assigned" {
                row.lease_until = Some(row.lease_until.map_or(grace, |l| l.max(grace)));
                assigned += 1;
            } else {
                st.queue.push_back(row.id.clone());
                queued += 1;
            }
            st.open
                .insert((row.ticker.clone(), row.interval), row.id.clone());
            st.jobs.insert(
                row.id.clone(),
                Job {
                    row,
                    progress: None,
                    since: Instant::now(),
                },
            );
        }
        if queued + assigned > 0 {
            info!(queued, assigned, "jobs reloaded from the database");
        }
        myself.send_interval(st.args.heartbeat, || CoordinatorMsg::Tick);
        st.consumer = spawn_consumer(&myself, &st.args).await?;
        st.args.scope.monitor(myself.get_cell());
        // Predictor ports already in the group (this is a restart) get
        // every champion now: a change the previous incarnation was about
        // to send may have been lost with it.
        let present = st.args.scope.members(PREDICTORS);
        if !present.is_empty() {
            send_champions(&st, &present).await;
        }
        let port = PortArgs {
            coordinator: myself.clone(),
            heartbeat: st.args.heartbeat,
            lease: st.args.lease,
            scope: st.args.scope.clone(),
        };
        st.port = Some(CoordinatorPort::spawn(port, myself.get_cell()).await?);
        Ok(st)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ProcessGroupChanged(change) = &evt {
            membership(st, change).await;
            assign_pending(st).await;
            return Ok(());
        }
        let Some((child, why)) = stopped_child(&evt) else {
            return Ok(());
        };
        if st.port.as_ref().map(|c| c.get_id()) == Some(child) {
            return Err(format!("the coordinator's mesh port stopped: {why}").into());
        }
        if st.consumer.as_ref().map(|c| c.get_id()) != Some(child) {
            return Ok(());
        }
        st.consumer = None;
        let Some(backoff) = st.args.budget.allow() else {
            error!(reason = %why, "start_model consumer failed too often; the coordinator stops");
            myself.stop(Some(format!(
                "start_model consumer failed too often: {why}"
            )));
            return Ok(());
        };
        warn!(reason = %why, backoff_ms = backoff.as_millis() as u64, "start_model consumer failed, restarting");
        myself.send_after(backoff, || CoordinatorMsg::RestartConsumer);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // A registration or heartbeat whose caller gave up waiting
            // (the port's call timed out) is not acted on.
            CoordinatorMsg::Register { reply, .. } if reply.is_closed() => {}
            CoordinatorMsg::Heartbeat { reply, .. } if reply.is_closed() => {}
            CoordinatorMsg::Register { reg, reply } => {
                let r = register(st, reg).await;
                let _ = reply.send(r);
                assign_pending(st).await;
            }
            CoordinatorMsg::Heartbeat {
                node,
                incarnation,
                held,
                reply,
            } => {
                let _ = reply.send(heartbeat(st, &node, incarnation, held).await);
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
                assign_pending(st).await;
                if let Some(r) = reply {
                    let _ = r.send(started);
                }
            }
            CoordinatorMsg::Progress(p) => progress(st, p).await,
            CoordinatorMsg::Failure { failure, reply } => {
                let _ = reply.send(ack(fail_attempt(st, failure).await));
                assign_pending(st).await;
            }
            CoordinatorMsg::GetJob { id, reply } => {
                let status = match st.jobs.get(&id) {
                    Some(j) => Some(status_of(&j.row, j.progress.as_ref())),
                    None => match st.args.db.job(&id).await {
                        Ok(row) => row.map(|row| status_of(&row, None)),
                        Err(e) => {
                            warn!(job = %id, error = %e, "cannot read the job");
                            None
                        }
                    },
                };
                let _ = reply.send(status);
            }
            CoordinatorMsg::Report { report, reply } => {
                let _ = reply.send(ack(accept_report(st, report).await));
                assign_pending(st).await;
            }
            CoordinatorMsg::Tick => {
                tick(st).await;
                retrain_policy(st).await;
                assign_pending(st).await;
            }
            CoordinatorMsg::RestartConsumer => {
                if st.consumer.is_none() {
                    st.consumer = spawn_consumer(&myself, &st.args).await?;
                }
            }
            CoordinatorMsg::ListNodes(reply) => {
                let mut names: Vec<&String> = st.nodes.keys().chain(st.admin.keys()).collect();
                names.sort();
                names.dedup();
                let out = names.into_iter().map(|n| node_info(st, n)).collect();
                let _ = reply.send(out);
            }
            CoordinatorMsg::SetNodeState { node, state, reply } => {
                let r = set_node_state(st, &node, state).await;
                let _ = reply.send(r);
                assign_pending(st).await;
            }
            CoordinatorMsg::ChangeChampion {
                ticker,
                interval,
                version,
                reply,
            } => {
                let before = st
                    .args
                    .db
                    .models(Some(&ticker), Some(interval), false)
                    .await
                    .ok()
                    .and_then(|c| c.first().map(|m| m.version));
                let r = match version {
                    Some(v) => st.args.db.promote(&ticker, interval, v).await,
                    None => st.args.db.rollback(&ticker, interval).await,
                };
                if let Ok(m) = &r {
                    info!(ticker = %m.ticker, interval = %m.interval, version = m.version, how = if version.is_some() { "promote" } else { "rollback" }, "champion changed by an operator");
                    let was = before.map_or("none".to_string(), |v| format!("v{v}"));
                    let (kind, detail) = match version {
                        Some(_) => (
                            "promoted_by_operator",
                            format!("an operator made it champion (was {was})"),
                        ),
                        None => (
                            "rolled_back",
                            format!("an operator rolled back to it from {was}"),
                        ),
                    };
                    record_event(st, &m.ticker, m.interval, m.version, kind, detail).await;
                    broadcast(st, update_of(m));
                }
                let _ = reply.send(r);
            }
        }
        Ok(())
    }
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or_else(|_| chrono::Duration::seconds(30))
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

/// The API view of a job: `queued` until the trainer of the current attempt
/// reports that it started, then `running`; `done` or `failed`.
fn status_of(r: &JobRow, progress: Option<&JobProgress>) -> JobStatus {
    let state = match r.state.as_str() {
        "assigned" if progress.is_some() => "running",
        "assigned" | "queued" => "queued",
        s => s,
    };
    let p = progress.cloned().unwrap_or_default();
    JobStatus {
        job_id: r.id.clone(),
        ticker: r.ticker.clone(),
        interval: r.interval.to_string(),
        state: state.into(),
        model: r.model.clone().unwrap_or_default(),
        node: r.node.clone().unwrap_or_default(),
        train_epoch: p.train_epoch,
        epochs: if p.epochs > 0 {
            p.epochs
        } else {
            r.epochs.unwrap_or(0) as u32
        },
        train_loss: p.train_loss,
        val_loss: p.val_loss,
        version: if r.state == "done" { r.version } else { 0 },
        metrics_json: r.metrics.clone(),
        reason: r.reason.clone(),
        attempts: r.attempts as u32,
        epoch: r.epoch,
    }
}

async fn register(st: &mut CoordinatorState, reg: Registration) -> Result<(), String> {
    if let Some(n) = st.nodes.get(&reg.node) {
        if n.incarnation != reg.incarnation && n.last_seen.elapsed() < st.args.lease {
            warn!(node = %reg.node, "registration refused: a live process holds the name");
            return Err(format!(
                "node `{}` is already registered by a live process (another incarnation); a restarted node is accepted once the old one's lease ({} s) has passed",
                reg.node,
                st.args.lease.as_secs()
            ));
        }
    }
    let held: HashMap<String, i64> = reg.running.iter().cloned().collect();
    // What the coordinator has assigned to this name: adopted when the node
    // still runs it under the same epoch, ended otherwise.
    let mine: Vec<String> = st
        .jobs
        .values()
        .filter(|j| j.row.state == "assigned" && j.row.node.as_deref() == Some(&reg.node))
        .map(|j| j.row.id.clone())
        .collect();
    let mut running = HashSet::new();
    for id in mine {
        let epoch = st.jobs[&id].row.epoch;
        if held.get(&id) == Some(&epoch) {
            running.insert(id);
        } else {
            end_attempt(
                st,
                &id,
                format!("node {} came back without the job", reg.node),
                Ended::NodeLost,
            )
            .await;
        }
    }
    let port = trainer_port_of(&st.args.scope, &reg.node, &reg.roles);
    info!(node = %reg.node, roles = ?reg.roles, cpus = reg.cpus, gpus = reg.gpus, slots = reg.slots, adopted = running.len(), port = port.is_some(), "node registered");
    let ids: Vec<String> = running.iter().cloned().collect();
    let name = reg.node.clone();
    st.nodes.insert(
        reg.node.clone(),
        Node {
            cpus: reg.cpus,
            gpus: reg.gpus,
            slots: reg.slots.max(1) as usize,
            roles: reg.roles,
            incarnation: reg.incarnation,
            last_seen: Instant::now(),
            port,
            running,
        },
    );
    publish_health(st, &name).await;
    renew(st, &name, &ids).await
}

/// The mesh port of `node`'s trainer pool, when it has the train role and
/// its port is in the `trainers` group (announced by its mesh session).
fn trainer_port_of(
    scope: &mesh::Scope,
    node: &str,
    roles: &[String],
) -> Option<ActorRef<TrainerPortMsg>> {
    if !roles.iter().any(|r| r == "train") {
        return None;
    }
    match scope.one_named(TRAINERS, &scope.trainer_port(node)) {
        Ok(cell) => cell.map(Into::into),
        Err(e) => {
            error!(%node, error = %e, "the node gets no assignment while its port is claimed twice");
            None
        }
    }
}

/// The mesh's membership changed: a trainer port that left takes its node
/// with it (lost: nothing new is assigned; its jobs move when their leases
/// run out); one that joined is picked up by its registered node; a
/// predictor port that joined is sent every champion.
async fn membership(st: &mut CoordinatorState, change: &GroupChangeMessage) {
    match change {
        GroupChangeMessage::Leave(_, group, cells) if group == TRAINERS => {
            let gone: HashSet<_> = cells.iter().map(|c| c.get_id()).collect();
            let lost: Vec<String> = st
                .nodes
                .iter()
                .filter(|(_, n)| n.port.as_ref().is_some_and(|p| gone.contains(&p.get_id())))
                .map(|(name, _)| name.clone())
                .collect();
            for name in lost {
                let held = st.nodes.remove(&name).map_or(0, |n| n.running.len());
                warn!(node = %name, held, "node lost: its mesh session ended; its jobs move when their leases run out");
                publish_health(st, &name).await;
            }
        }
        GroupChangeMessage::Join(_, group, _) if group == TRAINERS => {
            let scope = st.args.scope.clone();
            for (name, n) in st.nodes.iter_mut().filter(|(_, n)| n.port.is_none()) {
                n.port = trainer_port_of(&scope, name, &n.roles);
                if n.port.is_some() {
                    info!(node = %name, "trainer port joined the mesh");
                }
            }
        }
        GroupChangeMessage::Join(_, group, cells) if group == PREDICTORS => {
            send_champions(st, cells).await;
        }
        _ => {}
    }
}

/// Casts every champion to each of the predictor ports `cells`.
async fn send_champions(st: &CoordinatorState, cells: &[ActorCell]) {
    let champions = match st.args.db.champions().await {
        Ok(c) => c,
        Err(e) => {
            // A registry reads the champions itself when it starts.
            warn!(error = %e, "cannot read the champions for the predictors");
            return;
        }
    };
    for cell in cells {
        let port: ActorRef<PredictorPortMsg> = cell.clone().into();
        for m in &champions {
            let _ = port.cast(PredictorPortMsg::Model(update_of(m).into()));
        }
    }
    info!(
        predictors = cells.len(),
        champions = champions.len(),
        "champions sent to predictors"
    );
}

/// Extends the leases of `ids` (jobs of `node`), in the database first.
async fn renew(st: &mut CoordinatorState, node: &str, ids: &[String]) -> Result<(), String> {
    if ids.is_empty() {
        return Ok(());
    }
    let until = Utc::now() + chrono_of(st.args.lease);
    st.args
        .db
        .renew_leases(node, ids, until)
        .await
        .map_err(|e| format!("cannot renew leases: {e}"))?;
    for id in ids {
        if let Some(j) = st.jobs.get_mut(id) {
            j.row.lease_until = Some(until);
        }
    }
    Ok(())
}

async fn heartbeat(
    st: &mut CoordinatorState,
    node: &str,
    incarnation: u64,
    held: Vec<(String, i64)>,
) -> Result<HeartbeatOutcome, String> {
    match st.nodes.get_mut(node) {
        Some(n) if n.incarnation == incarnation => n.last_seen = Instant::now(),
        _ => {
            return Ok(HeartbeatOutcome {
                registered: false,
                ..Default::default()
            })
        }
    }
    let mut renewed = Vec::new();
    let mut revoked = Vec::new();
    for (id, epoch) in &held {
        let current = st.jobs.get(id).is_some_and(|j| {
            j.row.state == "assigned"
                && j.row.node.as_deref() == Some(node)
                && j.row.epoch == *epoch
        });
        if current {
            renewed.push(id.clone());
        } else {
            revoked.push(id.clone());
        }
    }
    // Jobs assigned to the node that it does not hold (after a grace for
    // assignments still in flight) are lost.
    let grace = st.args.heartbeat * 2;
    let held_ids: HashSet<&String> = held.iter().map(|(id, _)| id).collect();
    let lost: Vec<String> = st.nodes[node]
        .running
        .iter()
        .filter(|id| !held_ids.contains(id))
        .filter(|id| st.jobs.get(*id).is_some_and(|j| j.since.elapsed() > grace))
        .cloned()
        .collect();
    for id in lost {
        end_attempt(
            st,
            &id,
            format!("node {node} no longer holds the job"),
            Ended::NodeLost,
        )
        .await;
    }
    renew(st, node, &renewed).await?;
    Ok(HeartbeatOutcome {
        registered: true,
        revoked,
        admin_state: st.admin.get(node).cloned().unwrap_or_default(),
    })
}

/// Ends leases that ran out and forgets nodes that stopped heartbeating.
async fn tick(st: &mut CoordinatorState) {
    let now = Utc::now();
    let expired: Vec<String> = st
        .jobs
        .values()
        .filter(|j| j.row.state == "assigned" && j.row.lease_until.is_none_or(|l| l < now))
        .map(|j| j.row.id.clone())
        .collect();
    for id in expired {
        let node = st.jobs[&id].row.node.clone().unwrap_or_default();
        end_attempt(
            st,
            &id,
            format!(
                "the lease on node {node} ran out ({} s without renewal)",
                st.args.lease.as_secs()
            ),
            Ended::NodeLost,
        )
        .await;
    }
    let lease = st.args.lease;
    let mut lost = Vec::new();
    st.nodes.retain(|name, n| {
        let alive = n.last_seen.elapsed() <= lease;
        if !alive {
            warn!(node = %name, "node lost (no heartbeat within the lease)");
            lost.push(name.clone());
        }
        alive
    });
    for name in lost {
        publish_health(st, &name).await;
    }
    let scope = st.args.scope.clone();
    for (name, n) in st.nodes.iter_mut().filter(|(_, n)| n.port.is_none()) {
        n.port = trainer_port_of(&scope, name, &n.roles);
    }
}

/// `[retrain]`: every `poll_secs`, each champion with no open job is
/// retrained (with its kind) once `every_bars` rows were stored after the
/// data of its (ticker, interval)'s newest version, champion or rejected,
/// or once that version is `schedule_secs` old. Counting from the newest
/// version, not the champion, keeps a rejected retrain from being tried
/// again on the same data.
async fn retrain_policy(st: &mut CoordinatorState) {
    let cfg = st.args.retrain.clone();
    if cfg.every_bars == 0 && cfg.schedule_secs == 0 && cfg.drift == 0.0 {
        return;
    }
    if st
        .retrain_looked
        .is_some_and(|t| t.elapsed() < Duration::from_secs(cfg.poll_secs))
    {
        return;
    }
    st.retrain_looked = Some(Instant::now());
    let champions = match st.args.db.champions().await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "retrain policy: cannot read the champions");
            return;
        }
    };
    for c in champions {
        if st.open.contains_key(&(c.ticker.clone(), c.interval)) {
            continue;
        }
        let newest = match st
            .args
            .db
            .models(Some(&c.ticker), Some(c.interval), true)
            .await
        {
            Ok(v) => v.into_iter().max_by_key(|m| m.version).unwrap_or(c.clone()),
            Err(e) => {
                warn!(ticker = %c.ticker, interval = %c.interval, error = %e, "retrain policy: cannot read the versions");
                continue;
            }
        };
        let mut why = None;
        if cfg.schedule_secs > 0
            && Utc::now() - newest.created_at >= chrono::Duration::seconds(cfg.schedule_secs as i64)
        {
            why = Some(format!(
                "v{} is {} s old",
                newest.version, cfg.schedule_secs
            ));
        }
        let data_to = serde_json::from_str::<serde_json::Value>(&newest.metrics)
            .ok()
            .and_then(|v| {
                v["data"]["to"]
                    .as_str()
                    .and_then(|t| t.parse::<chrono::DateTime<Utc>>().ok())
            });
        if why.is_none() && cfg.every_bars > 0 {
            if let Some(to) = data_to {
                match st
                    .args
                    .db
                    .count_aggregated_after(&c.ticker, c.interval, to)
                    .await
                {
                    Ok(n) if n as u64 >= cfg.every_bars => {
                        why = Some(format!(
                            "{n} rows stored after v{}'s data (to {to})",
                            newest.version
                        ));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(ticker = %c.ticker, error = %e, "retrain policy: cannot count the new rows")
                    }
                }
            }
        }
        // Drift: once per champion (no version trained since it).
        if why.is_none() && cfg.drift > 0.0 && newest.version == c.version {
            let test = serde_json::from_str::<serde_json::Value>(&c.metrics)
                .ok()
                .and_then(|v| v["model"]["rmse"].as_f64())
                .filter(|r| r.is_finite() && *r > 0.0);
            match (
                st.args
                    .db
                    .live_error(&c.ticker, c.interval, c.version)
                    .await,
                test,
            ) {
                (Ok(Some(l)), Some(test))
                    if l.bars as usize >= cfg.drift_bars && l.rmse > (1.0 + cfg.drift) * test =>
                {
                    why = Some(format!(
                        "drift: the live RMSE {:.6} over {} bars is {:.2} times the test RMSE {test:.6}",
                        l.rmse,
                        l.bars,
                        l.rmse / test
                    ));
                }
                (Err(e), _) => {
                    warn!(ticker = %c.ticker, error = %e, "retrain policy: cannot read the live error")
                }
                _ => {}
            }
        }
        let Some(why) = why else {
            continue;
        };
        let kind = c.kind.parse::<ModelKind>().ok();
        let started = start_jobs(st, vec![c.ticker.clone()], c.interval, kind, None).await;
        if started.queued > 0 {
            metrics::counter!("tickmesh_retrains_total").increment(1);
            info!(ticker = %c.ticker, interval = %c.interval, reason = %why, "retraining the champion");
        } else if !started.refused.is_empty() {
            warn!(ticker = %c.ticker, interval = %c.interval, refused = ?started.refused, "retrain policy: not queued");
        }
    }
}

/// Queues one job per ticker that has aggregated data (or reuses the open one).
async fn start_jobs(
    st: &mut CoordinatorState,
    tickers: Vec<String>,
    interval: Interval,
    model: Option<ModelKind>,
    epochs: Option<usize>,
) -> Started {
    let mut out = Started::default();
    let mut fresh = Vec::new();
    for t in tickers {
        match st.open.get(&(t.clone(), interval)) {
            Some(id) => out.job_ids.push(id.clone()),
            None if !fresh.contains(&t) => fresh.push(t),
            None => {}
        }
    }
    if fresh.is_empty() {
        return out;
    }
    let known = match st.args.db.tickers_with_data(interval, &fresh).await {
        Ok(k) => k,
        Err(e) => {
            out.unavailable = true;
            out.refused.extend(
                fresh
                    .iter()
                    .map(|t| format!("{t}: the database is unavailable: {e}")),
            );
            return out;
        }
    };
    for ticker in fresh {
        if !known.contains(&ticker) {
            out.refused.push(format!(
                "{ticker}: unknown ticker: no aggregated_data rows for interval {interval}"
            ));
            continue;
        }
        if st.open.len() >= st.args.max_open_jobs {
            out.refused.push(format!(
                "{ticker}: too many open jobs ({} queued or running; coordinator.max_open_jobs)",
                st.open.len()
            ));
            continue;
        }
        let id = format!(
            "{ticker}-{interval}-{:x}-{:04x}",
            Utc::now().timestamp_micros(),
            rand::random::<u16>()
        );
        let row = JobRow::queued(
            id.clone(),
            ticker.clone(),
            interval,
            model.map(|m| m.to_string()),
            epochs.map(|e| e as i64),
        );
        if let Err(e) = st.args.db.upsert_job(&row).await {
            out.unavailable = true;
            out.refused
                .push(format!("{ticker}: the database is unavailable: {e}"));
            continue;
        }
        st.open.insert((ticker, interval), id.clone());
        st.queue.push_back(id.clone());
        st.jobs.insert(
            id.clone(),
            Job {
                row,
                progress: None,
                since: Instant::now(),
            },
        );
        out.job_ids.push(id);
        out.queued += 1;
    }
    out
}

/// The trainer node with the most free slots, GPU nodes first.
fn pick_node(st: &CoordinatorState) -> Option<String> {
    st.nodes
        .iter()
        .filter(|(name, n)| n.can_take() && !st.admin.contains_key(*name))
        .min_by_key(|(name, n)| (n.gpus == 0, std::cmp::Reverse(n.free()), (*name).clone()))
        .map(|(name, _)| name.clone())
}

/// Hands queued jobs whose backoff has passed to trainer nodes while any
/// has a free slot.
async fn assign_pending(st: &mut CoordinatorState) {
    let now = Utc::now();
    let mut i = 0;
    while i < st.queue.len() {
        let id = st.queue[i].clone();
        let Some(job) = st.jobs.get(&id).filter(|j| j.row.state == "queued") else {
            st.queue.remove(i);
            continue;
        };
        if job.row.not_before > now {
            i += 1;
            continue;
        }
        let Some(node) = pick_node(st) else { break };
        let mut row = job.row.clone();
        let lease_until = now + chrono_of(st.args.lease);
        if let Err(e) = st.args.db.assign_job(&mut row, &node, lease_until).await {
            error!(job = %id, %node, error = %e, "cannot record the assignment; the job stays queued");
            break;
        }
        let a = Assignment {
            ticker: row.ticker.clone(),
            interval: row.interval.to_string(),
            epoch: row.epoch,
            version: row.version,
            job_id: id.clone(),
            model: row.model.clone().unwrap_or_default(),
            epochs: row.epochs.unwrap_or(0) as u32,
            resume_key: row.snapshot_key.clone(),
            attempt: row.attempts as u32,
        };
        st.queue.remove(i);
        let n = st.nodes.get_mut(&node).expect("picked node exists");
        n.running.insert(id.clone());
        let sent = n
            .port
            .as_ref()
            .is_some_and(|p| p.cast(TrainerPortMsg::Assign(a.into())).is_ok());
        info!(ticker = %row.ticker, interval = %row.interval, %node, epoch = row.epoch, version = row.version, attempt = row.attempts, resume = !row.snapshot_key.is_empty(), job = %id, "job assigned");
        let job = st.jobs.get_mut(&id).expect("job exists");
        job.row = row;
        job.progress = None;
        job.since = Instant::now();
        if !sent {
            // The port stopped between the check and the send.
            if let Some(n) = st.nodes.get_mut(&node) {
                n.port = None;
            }
            end_attempt(
                st,
                &id,
                format!("node {node}'s trainer port is gone"),
                Ended::NodeLost,
            )
            .await;
        }
    }
}

/// Why an attempt ended, which decides when the job may run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The job itself failed (a failure report, a refused checkpoint): the
    /// retry waits a jittered backoff that doubles with each attempt.
    Failed,
    /// Its node went away (lease ran out, the node came back without it, its
    /// stream closed): the job is queued again at once. It still counts
    /// against `max_attempts`, so a job that kills every node it lands on
    /// ends failed.
    NodeLost,
}

/// Ends the current attempt of an assigned job: queued again (after a
/// backoff when the job failed) while attempts remain, failed otherwise.
/// Written to the database first.
async fn end_attempt(st: &mut CoordinatorState, id: &str, reason: String, why: Ended) {
    let Some(job) = st.jobs.get(id) else { return };
    let mut row = job.row.clone();
    if let Some(node) = row.node.as_ref().and_then(|n| st.nodes.get_mut(n)) {
        node.running.remove(id);
    }
    let now = Utc::now();
    row.lease_until = None;
    row.updated_at = now;
    row.reason = reason.clone();
    if row.attempts >= st.args.max_attempts as i64 {
        row.state = "failed".into();
        row.reason = format!("failed after {} attempts; the last: {reason}", row.attempts);
        warn!(job = %id, ticker = %row.ticker, interval = %row.interval, reason = %row.reason, "job failed");
    } else {
        let base = st.args.retry_backoff.as_millis() as u64;
        let backoff = match why {
            Ended::Failed => base.saturating_mul(1 << (row.attempts.max(1) - 1).min(10)),
            Ended::NodeLost => 0,
        };
        let jitter = rand::random::<u64>() % (backoff / 2 + 1);
        row.state = "queued".into();
        row.not_before = now + chrono::Duration::milliseconds((backoff + jitter) as i64);
        warn!(job = %id, ticker = %row.ticker, interval = %row.interval, attempt = row.attempts, retry_in_ms = backoff + jitter, %reason, "attempt ended; the job is queued again");
    }
    if let Err(e) = st.args.db.upsert_job(&row).await {
        // The lease runs out again after a restart and the job is retried.
        error!(job = %id, error = %e, "cannot record the end of the attempt");
    }
    if let Err(e) = st
        .args
        .db
        .close_attempt(id, row.epoch, "ended", &reason)
        .await
    {
        warn!(job = %id, error = %e, "cannot close the attempt's lineage row");
    }
    let finished = row.state == "failed";
    let job = st.jobs.get_mut(id).expect("job exists");
    job.row = row;
    job.progress = None;
    if finished {
        finish(st, id);
    } else {
        st.queue.push_back(id.to_string());
    }
}

/// Closes a finished job: it no longer holds its ticker-interval, and the
/// oldest finished jobs beyond the cap are forgotten (the database keeps them).
fn finish(st: &mut CoordinatorState, id: &str) {
    if let Some(j) = st.jobs.get(id) {
        let key = (j.row.ticker.clone(), j.row.interval);
        if st.open.get(&key).map(String::as_str) == Some(id) {
            st.open.remove(&key);
        }
        st.finished.push_back(id.to_string());
    }
    while st.finished.len() > MAX_FINISHED {
        if let Some(old) = st.finished.pop_front() {
            st.jobs.remove(&old);
        }
    }
}

/// The job a report names, when it is the job's current assignment.
fn current<'a>(
    st: &'a CoordinatorState,
    id: &str,
    node: &str,
    epoch: i64,
) -> Result<&'a Job, String> {
    let j = st
        .jobs
        .get(id)
        .ok_or_else(|| format!("unknown job `{id}`"))?;
    if j.row.state != "assigned" || j.row.node.as_deref() != Some(node) || j.row.epoch != epoch {
        return Err(format!(
            "stale report for job {id} ({} {}): epoch {epoch} from {node}; the job is {} (epoch {} on {})",
            j.row.ticker,
            j.row.interval,
            j.row.state,
            j.row.epoch,
            j.row.node.as_deref().unwrap_or("-")
        ));
    }
    Ok(j)
}

async fn progress(st: &mut CoordinatorState, p: JobProgress) {
    let Ok(j) = current(st, &p.job_id, &p.node, p.epoch) else {
        return;
    };
    let before = j.row.snapshot_key.clone();
    let mut row = j.row.clone();
    if !p.snapshot_key.is_empty() && p.snapshot_key != row.snapshot_key {
        row.snapshot_key = p.snapshot_key.clone();
        row.updated_at = Utc::now();
        if let Err(e) = st.args.db.upsert_job(&row).await {
            warn!(job = %p.job_id, error = %e, "cannot record the snapshot; a retry starts from the previous one");
            row.snapshot_key = before;
        }
    }
    let j = st.jobs.get_mut(&p.job_id).expect("current job exists");
    j.row = row;
    j.progress = Some(p);
}

async fn fail_attempt(st: &mut CoordinatorState, f: JobFailure) -> Result<(), String> {
    current(st, &f.job_id, &f.node, f.epoch)?;
    end_attempt(st, &f.job_id, f.reason, Ended::Failed).await;
    Ok(())
}

async fn accept_report(st: &mut CoordinatorState, r: CheckpointReport) -> Result<(), String> {
    let mut row = current(st, &r.job_id, &r.node, r.epoch)?.row.clone();
    let interval = row.interval;
    if r.version != row.version || r.ticker != row.ticker || r.interval != interval.as_str() {
        return Err(format!(
            "report for job {} names {} {} v{}; the attempt writes {} {interval} v{}",
            r.job_id, r.ticker, r.interval, r.version, row.ticker, row.version
        ));
    }
    let key = format!("/{}", model_prefix(&r.ticker, interval, r.version));
    if !r.uri.ends_with(&key) {
        return Err(format!(
            "checkpoint uri `{}` is not the attempt's key (…{key})",
            r.uri
        ));
    }
    // The gate: against naive and the champion the trainer scored.
    let champion_now = match st
        .args
        .db
        .models(Some(&r.ticker), Some(interval), false)
        .await
    {
        Ok(c) => c.first().map(|m| m.version),
        Err(e) => {
            // The attempt's lease still runs: the trainer reports again.
            return Err(format!("cannot read the champion to compare with: {e}"));
        }
    };
    let decision = gate::decide(&st.args.promotion, &r.metrics_json, champion_now);
    let metrics = decision.annotate(&r.metrics_json, &st.args.promotion);
    let m = ModelVersion {
        ticker: r.ticker.clone(),
        interval,
        version: r.version,
        kind: r.kind.clone(),
        uri: r.uri.clone(),
        sha256: r.sha256.clone(),
        metrics: metrics.clone(),
        status: if decision.promoted {
            "champion"
        } else {
            "rejected"
        }
        .into(),
        created_at: Utc::now(),
    };
    if let Err(e) = st.args.db.insert_model_version(&m).await {
        let reason = format!("the model registry refused version {}: {e}", r.version);
        end_attempt(st, &r.job_id, reason.clone(), Ended::Failed).await;
        return Err(reason);
    }
    if let Some(n) = st.nodes.get_mut(&r.node) {
        n.running.remove(&r.job_id);
    }
    row.state = "done".into();
    row.lease_until = None;
    row.metrics = metrics;
    row.reason.clear();
    row.updated_at = Utc::now();
    if row.model.is_none() {
        row.model = Some(r.kind.clone());
    }
    if let Err(e) = st.args.db.upsert_job(&row).await {
        // The model is registered; the job row catches up on the next write.
        error!(job = %r.job_id, error = %e, "cannot record that the job is done");
    }
    if let Err(e) = st
        .args
        .db
        .close_attempt(&r.job_id, r.epoch, "done", "")
        .await
    {
        warn!(job = %r.job_id, error = %e, "cannot close the attempt's lineage row");
    }
    st.jobs.get_mut(&r.job_id).expect("current job exists").row = row;
    finish(st, &r.job_id);
    record_event(
        st,
        &r.ticker,
        interval,
        r.version,
        if decision.promoted {
            "promoted"
        } else {
            "rejected"
        },
        decision.reason.clone(),
    )
    .await;
    if decision.promoted {
        metrics::counter!("tickmesh_model_promotions_total", "outcome" => "promoted").increment(1);
        info!(ticker = %r.ticker, %interval, version = r.version, job = %r.job_id, reason = %decision.reason, "model version promoted to champion");
        broadcast(st, update_of(&m));
    } else {
        metrics::counter!("tickmesh_model_promotions_total", "outcome" => "rejected").increment(1);
        warn!(ticker = %r.ticker, %interval, version = r.version, job = %r.job_id, reason = %decision.reason, "model version rejected; the champion stays");
    }
    Ok(())
}

/// Records a model event (`Admin.ListModelEvents`, the dashboard); a
/// failure is logged and counted: the registry holds the decision itself.
async fn record_event(
    st: &CoordinatorState,
    ticker: &str,
    interval: Interval,
    version: i64,
    kind: &str,
    detail: String,
) {
    let e = tickmesh_io::db::ModelEventRow {
        ticker: ticker.to_string(),
        interval,
        version,
        kind: kind.to_string(),
        node: "coordinator".into(),
        detail,
        at: Utc::now(),
    };
    if let Err(err) = st.args.db.record_model_event(&e).await {
        metrics::counter!("tickmesh_model_event_failures_total").increment(1);
        warn!(ticker, %interval, version, kind, error = %err, "cannot record the model event");
    }
}

/// Casts a champion to every predictor port on the mesh (never waiting on
/// one: a cast is queued by the port's node session).
fn broadcast(st: &mut CoordinatorState, update: ModelUpdate) {
    for cell in st.args.scope.members(PREDICTORS) {
        let port: ActorRef<PredictorPortMsg> = cell.into();
        if let Err(e) = port.cast(PredictorPortMsg::Model(update.clone().into())) {
            warn!(error = %e, "a predictor port is gone; it gets the champions when it joins again");
        }
    }
}

/// The Admin view of a node.
fn node_info(st: &CoordinatorState, name: &str) -> NodeInfo {
    let admin = st.admin.get(name).map(String::as_str);
    match st.nodes.get(name) {
        Some(n) => {
            let mut running: Vec<String> = n.running.iter().cloned().collect();
            running.sort();
            let state = match admin {
                Some("draining") if running.is_empty() => "drained",
                Some(s) => s,
                None => "ready",
            };
            NodeInfo {
                node: name.to_string(),
                roles: n.roles.clone(),
                cpus: n.cpus,
                gpus: n.gpus,
                slots: n.slots as u32,
                running,
                state: state.into(),
                last_seen_secs: n.last_seen.elapsed().as_secs_f64(),
            }
        }
        None => NodeInfo {
            node: name.to_string(),
            state: "lost".into(),
            last_seen_secs: -1.0,
            ..Default::default()
        },
    }
}

/// Publishes a node's health: NOT_SERVING while draining or gone.
async fn publish_health(st: &CoordinatorState, node: &str) {
    let Some(h) = &st.args.health else { return };
    let serving =
        st.nodes.contains_key(node) && st.admin.get(node).map(String::as_str) != Some("draining");
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    h.set_service_status(node_health_name(node), status).await;
}

/// Cordons, drains or readies a node: health first, then the database, then
/// the jobs (a handoff revokes them; the node's next heartbeat stops them).
async fn set_node_state(
    st: &mut CoordinatorState,
    node: &str,
    state: AdminState,
) -> Result<NodeInfo, String> {
    if !st.nodes.contains_key(node) && !st.admin.contains_key(node) {
        return Err(format!(
            "unknown node `{node}`: no trainer node of that name is connected"
        ));
    }
    let before = st.admin.get(node).cloned();
    match state.stored() {
        Some(s) => st.admin.insert(node.to_string(), s.to_string()),
        None => st.admin.remove(node),
    };
    publish_health(st, node).await;
    if let Err(e) = st.args.db.set_node_state(node, state.stored()).await {
        match before {
            Some(b) => st.admin.insert(node.to_string(), b),
            None => st.admin.remove(node),
        };
        publish_health(st, node).await;
        return Err(format!("cannot record the state of {node}: {e}"));
    }
    if let AdminState::Draining { handoff: true } = state {
        let running: Vec<String> = st
            .nodes
            .get(node)
            .map(|n| n.running.iter().cloned().collect())
            .unwrap_or_default();
        for id in running {
            requeue_now(st, &id, format!("node {node} was drained with handoff")).await;
        }
    }
    info!(%node, state = ?state, "node state set by an operator");
    Ok(node_info(st, node))
}

/// Ends an attempt that an operator interrupted: it does not count against
/// the job's attempts, and the job is queued again at once.
async fn requeue_now(st: &mut CoordinatorState, id: &str, reason: String) {
    if let Some(j) = st.jobs.get_mut(id) {
        j.row.attempts = (j.row.attempts - 1).max(0);
    }
    end_attempt(st, id, reason, Ended::NodeLost).await;
}
