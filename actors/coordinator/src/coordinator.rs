//! `CoordinatorActor`: receives node registrations, heartbeats, start
//! signals and checkpoint reports (from the gRPC service and the
//! `start_model` consumer). It assigns each (ticker, interval) job to one
//! trainer node (GPU nodes first, then the least loaded) under a new epoch,
//! records checkpoints as champions in `model_versions`, and pushes each new
//! version to every predictor watching. A report stamped with an epoch other
//! than the job's current one is refused. A node whose heartbeats stop for
//! `lease_secs` is dropped and its jobs are reassigned with a higher epoch.
//! It supervises its `StartModelConsumer`: a consumer that fails (the bus is
//! down) is restarted after a backoff while the restart budget lasts; then
//! the coordinator stops, and its node exits non-zero.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::Utc;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tickmesh_core::bus::{BusConfig, SharedPublisher};
use tickmesh_core::db::{Db, ModelVersion};
use tickmesh_core::supervision::{stopped_child, RestartBudget};
use tickmesh_core::types::Interval;
use tickmesh_proto::v1::{Assignment, CheckpointAck, CheckpointReport, ModelUpdate};
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
    /// Train these tickers on this interval; replies with how many jobs were queued.
    Start {
        tickers: Vec<String>,
        interval: Interval,
        reply: Option<RpcReplyPort<u32>>,
    },
    /// A trainer reports a checkpoint.
    Report {
        report: CheckpointReport,
        reply: RpcReplyPort<CheckpointAck>,
    },
    /// Check leases (sent to itself every heartbeat period).
    Tick,
}

impl ractor::Message for CoordinatorMsg {}

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
    node: String,
    epoch: i64,
    version: i64,
}

pub struct CoordinatorState {
    args: CoordinatorArgs,
    consumer: Option<ActorCell>,
    nodes: HashMap<String, Node>,
    pending: VecDeque<(String, Interval)>,
    active: HashMap<(String, Interval), ActiveJob>,
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
                for m in st.args.db.champions().await? {
                    let _ = tx.send(Ok(update_of(&m))).await;
                }
                st.watchers.push(tx);
            }
            CoordinatorMsg::Start {
                tickers,
                interval,
                reply,
            } => {
                let mut queued = 0;
                for t in tickers {
                    let key = (t, interval);
                    if !st.pending.contains(&key) {
                        st.pending.push_back(key);
                        queued += 1;
                    }
                }
                info!(%interval, queued, "training requested");
                assign_pending(st).await?;
                if let Some(r) = reply {
                    let _ = r.send(queued);
                }
            }
            CoordinatorMsg::Report { report, reply } => {
                let ack = accept_report(st, report).await;
                let ack = match ack {
                    Ok(()) => CheckpointAck {
                        accepted: true,
                        reason: String::new(),
                    },
                    Err(reason) => CheckpointAck {
                        accepted: false,
                        reason,
                    },
                };
                let _ = reply.send(ack);
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
                    warn!(%node, "node lost (no heartbeat within the lease); reassigning its jobs");
                    st.nodes.remove(&node);
                    let jobs: Vec<_> = st
                        .active
                        .iter()
                        .filter(|(_, j)| j.node == node)
                        .map(|(k, _)| k.clone())
                        .collect();
                    for k in jobs {
                        st.active.remove(&k);
                        st.pending.push_front(k);
                    }
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

/// Hands pending jobs to trainer nodes while any can take one.
async fn assign_pending(st: &mut CoordinatorState) -> Result<(), ActorProcessingErr> {
    while let Some((ticker, interval)) = st.pending.front().cloned() {
        if st.active.contains_key(&(ticker.clone(), interval)) {
            // Already being trained: run again after the current one reports.
            break;
        }
        let best = st
            .nodes
            .iter()
            .filter(|(_, n)| n.assignments.as_ref().is_some_and(|tx| !tx.is_closed()))
            .filter(|(_, n)| n.roles.iter().any(|r| r == "train"))
            .min_by_key(|(name, n)| (n.gpus == 0, n.load, (*name).clone()))
            .map(|(name, _)| name.clone());
        let Some(node) = best else { break };
        st.pending.pop_front();
        let epoch = st.args.db.assignment_epoch(&ticker, interval).await? + 1;
        let version = st.args.db.next_model_version(&ticker, interval).await?;
        let lease_until =
            Utc::now() + chrono::Duration::from_std(st.args.lease).unwrap_or_default();
        st.args
            .db
            .upsert_assignment(&ticker, interval, &node, epoch, lease_until)
            .await?;
        let n = st.nodes.get_mut(&node).expect("chosen node exists");
        let tx = n.assignments.clone().expect("chosen node watches");
        n.load += 1;
        let a = Assignment {
            ticker: ticker.clone(),
            interval: interval.to_string(),
            epoch,
            version,
        };
        if tx.send(Ok(a)).await.is_err() {
            n.assignments = None;
            n.load -= 1;
            st.pending.push_front((ticker, interval));
            continue;
        }
        info!(%ticker, %interval, %node, epoch, version, "job assigned");
        st.active.insert(
            (ticker, interval),
            ActiveJob {
                node,
                epoch,
                version,
            },
        );
    }
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
    if job.epoch != r.epoch || job.node != r.node || job.version != r.version {
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
    st.args
        .db
        .insert_model_version(&m)
        .await
        .map_err(|e| e.to_string())?;
    st.active.remove(&key);
    if let Some(n) = st.nodes.get_mut(&r.node) {
        n.load = n.load.saturating_sub(1);
    }
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
