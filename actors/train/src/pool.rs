//! `TrainerPool`: the train role's node agent. Registers the node with the
//! coordinator over gRPC, heartbeats, watches its assignment stream, hands
//! each job to the `TrainerActor` of its (ticker, interval) (spawned linked
//! on first use), forwards each finished training epoch as progress, and
//! reports every outcome back with the job's assignment epoch: a checkpoint,
//! or a failure with its reason (so the job never stays active). A trainer
//! that crashes is dropped, its job reported failed, and it is respawned on
//! its next job.

use std::collections::HashMap;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tickmesh_core::config::Role;
use tickmesh_core::types::Interval;
use tickmesh_model::fit::EpochProgress;
use tickmesh_proto::v1::coordinator_client::CoordinatorClient;
use tickmesh_proto::v1::{
    CheckpointReport, HeartbeatRequest, JobFailure, JobProgress, RegisterNodeRequest,
    WatchAssignmentsRequest,
};
use tonic::transport::Channel;
use tracing::{error, info, warn};

use crate::trainer::{Job, TrainOutcome, TrainerActor, TrainerArgs, TrainerMsg};

pub struct TrainerPool;

/// Messages of [`TrainerPool`].
pub enum PoolMsg {
    /// The coordinator assigned a job (from the watch stream).
    Assigned(Job),
    /// A trainer finished a training epoch of a job.
    Progress { job: Job, progress: EpochProgress },
    /// A trainer finished a job (from the trainer).
    Finished {
        job: Job,
        outcome: Result<TrainOutcome, String>,
    },
}

impl ractor::Message for PoolMsg {}

#[derive(Clone)]
pub struct TrainerPoolArgs {
    pub node: String,
    /// `host:port` of the coordinator's gRPC server.
    pub coordinator: String,
    pub cpus: u32,
    pub gpus: u32,
    pub trainer: TrainerArgs,
}

pub struct TrainerPoolState {
    args: TrainerPoolArgs,
    client: CoordinatorClient<Channel>,
    trainers: HashMap<(String, Interval), (ActorRef<TrainerMsg>, Option<Job>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Connects to the coordinator, retrying for up to `wait`.
pub async fn connect(addr: &str, wait: Duration) -> Result<CoordinatorClient<Channel>, String> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match CoordinatorClient::connect(format!("http://{addr}")).await {
            Ok(c) => return Ok(c.max_decoding_message_size(64 << 20)),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(format!("cannot reach the coordinator at {addr}: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
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
        let mut client = connect(&args.coordinator, Duration::from_secs(30)).await?;
        let reply = client
            .register_node(RegisterNodeRequest {
                node: args.node.clone(),
                roles: vec![Role::Train.as_str().into()],
                cpus: args.cpus,
                gpus: args.gpus,
            })
            .await?
            .into_inner();
        let mut stream = client
            .watch_assignments(WatchAssignmentsRequest {
                node: args.node.clone(),
            })
            .await?
            .into_inner();
        info!(node = %args.node, coordinator = %args.coordinator, device = %tickmesh_model::device_name(args.trainer.device), "trainer pool registered");
        let me = myself.clone();
        let watch = tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(a)) => match job_of(a) {
                        Ok(job) => {
                            if me.cast(PoolMsg::Assigned(job)).is_err() {
                                return;
                            }
                        }
                        Err(e) => warn!(error = %e, "assignment ignored"),
                    },
                    Ok(None) => {
                        error!("the coordinator closed the assignment stream");
                        me.stop(Some("assignment stream closed".into()));
                        return;
                    }
                    Err(e) => {
                        error!(error = %e, "assignment stream failed");
                        me.stop(Some(format!("assignment stream failed: {e}")));
                        return;
                    }
                }
            }
        });
        let mut hb_client = client.clone();
        let node = args.node.clone();
        let every = Duration::from_secs(reply.heartbeat_secs.max(1));
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = hb_client
                    .heartbeat(HeartbeatRequest { node: node.clone() })
                    .await
                {
                    warn!(error = %e, "heartbeat failed");
                }
            }
        });
        Ok(TrainerPoolState {
            args,
            client,
            trainers: HashMap::new(),
            tasks: vec![watch, heartbeat],
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for t in &state.tasks {
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
                info!(ticker = %job.ticker, interval = %job.interval, epoch = job.epoch, version = job.version, "job assigned");
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
                trainer.cast(TrainerMsg::Train { job, pool: myself })?;
            }
            PoolMsg::Progress { job, progress: p } => {
                if p.epoch == 0 {
                    // The trainer took a slot and started this job.
                    if let Some((_, running)) =
                        state.trainers.get_mut(&(job.ticker.clone(), job.interval))
                    {
                        *running = Some(job.clone());
                    }
                }
                let mut client = state.client.clone();
                let msg = JobProgress {
                    node: state.args.node.clone(),
                    job_id: job.id.clone(),
                    epoch: job.epoch,
                    train_epoch: p.epoch as u32,
                    epochs: p.epochs as u32,
                    train_loss: p.train_loss,
                    val_loss: p.val_loss,
                };
                tokio::spawn(async move {
                    if let Err(e) = client.report_progress(msg).await {
                        warn!(error = %e, "progress report failed");
                    }
                });
            }
            PoolMsg::Finished { job, outcome } => {
                if let Some((_, running)) =
                    state.trainers.get_mut(&(job.ticker.clone(), job.interval))
                {
                    *running = None;
                }
                let report = match outcome {
                    Ok(o) => CheckpointReport {
                        node: state.args.node.clone(),
                        ticker: job.ticker.clone(),
                        interval: job.interval.to_string(),
                        epoch: job.epoch,
                        version: job.version,
                        uri: o.uri,
                        sha256: o.digest,
                        kind: o.kind.to_string(),
                        metrics_json: serde_json::to_string(&o.metrics)?,
                        job_id: job.id.clone(),
                    },
                    Err(e) => {
                        error!(ticker = %job.ticker, interval = %job.interval, error = %e, "training failed");
                        report_failure(state, &job, e);
                        return Ok(());
                    }
                };
                let client = state.client.clone();
                tokio::spawn(async move {
                    let (ticker, interval) = (report.ticker.clone(), report.interval.clone());
                    let r = with_retries("checkpoint report", || {
                        let (mut c, r) = (client.clone(), report.clone());
                        async move { c.report_checkpoint(r).await }
                    })
                    .await;
                    match r {
                        Some(ack) if ack.accepted => {
                            info!(%ticker, %interval, version = report.version, "checkpoint accepted")
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

/// A job from an assignment.
fn job_of(a: tickmesh_proto::v1::Assignment) -> Result<Job, String> {
    let interval = a.interval.parse::<Interval>().map_err(|e| e.to_string())?;
    let model = match a.model.as_str() {
        "" => None,
        m => Some(m.parse().map_err(|e: tickmesh_core::Error| e.to_string())?),
    };
    Ok(Job {
        id: a.job_id,
        ticker: a.ticker,
        interval,
        epoch: a.epoch,
        version: a.version,
        model,
        epochs: (a.epochs > 0).then_some(a.epochs as usize),
    })
}

/// Calls the coordinator up to 5 times with backoff (0.5 s doubling);
/// `None` (and an error logged) when every try failed: the coordinator then
/// reassigns the job when its lease runs out.
async fn with_retries<T, F, Fut>(what: &str, mut call: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=5 {
        match call().await {
            Ok(r) => return Some(r.into_inner()),
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

/// Tells the coordinator a job failed, so it is not left active (in the
/// background, with retries: the pool never stops on a failed call).
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
    let client = state.client.clone();
    tokio::spawn(async move {
        let ack = with_retries("failure report", || {
            let (mut c, f) = (client.clone(), failure.clone());
            async move { c.report_failure(f).await }
        })
        .await;
        if let Some(ack) = ack.filter(|a| !a.accepted) {
            warn!(ticker = %failure.ticker, interval = %failure.interval, reason = %ack.reason, "failure report refused");
        }
    });
}
