//! The tonic `Coordinator` service in front of [`CoordinatorActor`], and the
//! server of the coordinator's gRPC port: `Coordinator` (nodes; the cluster
//! cookie), `Admin` (operators; the admin token, see [`crate::admin`]),
//! `grpc.health.v1` and reflection, over TLS when configured. Actor errors
//! map to `tonic::Status` here and in `admin` only.
//!
//! [`CoordinatorActor`]: crate::coordinator::CoordinatorActor

use std::future::Future;
use std::time::Duration;

use ractor::{call_t, ActorRef};
use tickmesh_core::db::Db;
use tickmesh_core::supervision::Slot;
use tickmesh_core::types::{validate_ticker, Interval};
use tickmesh_proto::auth::Guard;
use tickmesh_proto::v1::admin_server::AdminServer;
use tickmesh_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use tickmesh_proto::v1::*;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::admin::AdminService;
use crate::coordinator::{CoordinatorMsg, Registration};

/// The largest request either service decodes.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

pub(crate) const CALL_TIMEOUT_MS: u64 = 30_000;
/// Jobs one node may list as running or held.
const MAX_HELD: usize = 10_000;
/// Tickers in one start request.
pub const MAX_TICKERS_PER_REQUEST: usize = 10_000;

pub struct CoordinatorService {
    actor: Slot<CoordinatorMsg>,
    heartbeat: Duration,
    lease: Duration,
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("coordinator actor: {e}"))
}

/// The coordinator actor's current incarnation.
pub(crate) fn current(slot: &Slot<CoordinatorMsg>) -> Result<ActorRef<CoordinatorMsg>, Status> {
    slot.get()
        .ok_or_else(|| Status::unavailable("the coordinator actor is starting"))
}

/// Validates a start request and queues its jobs (Coordinator.StartTraining
/// and Admin.Train).
pub(crate) async fn start_training(
    actor: &ActorRef<CoordinatorMsg>,
    r: StartTrainingRequest,
) -> Result<StartTrainingReply, Status> {
    let interval: Interval = r
        .interval
        .parse()
        .map_err(|e: tickmesh_core::Error| Status::invalid_argument(e.to_string()))?;
    if r.tickers.is_empty() {
        return Err(Status::invalid_argument("no tickers"));
    }
    if r.tickers.len() > MAX_TICKERS_PER_REQUEST {
        return Err(Status::invalid_argument(format!(
            "{} tickers in one request; at most {MAX_TICKERS_PER_REQUEST}",
            r.tickers.len()
        )));
    }
    for t in &r.tickers {
        validate_ticker(t).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    let model = match r.model.as_str() {
        "" => None,
        m => Some(
            m.parse()
                .map_err(|e: tickmesh_core::Error| Status::invalid_argument(e.to_string()))?,
        ),
    };
    if r.epochs > 10_000 {
        return Err(Status::invalid_argument("epochs must be at most 10000"));
    }
    let epochs = (r.epochs > 0).then_some(r.epochs as usize);
    let tickers = r.tickers;
    let s = call_t!(
        actor,
        |reply| CoordinatorMsg::Start {
            tickers,
            interval,
            model,
            epochs,
            reply: Some(reply)
        },
        CALL_TIMEOUT_MS
    )
    .map_err(unavailable)?;
    if s.unavailable && s.job_ids.is_empty() {
        return Err(Status::unavailable(s.refused.join("; ")));
    }
    Ok(StartTrainingReply {
        queued: s.queued,
        job_ids: s.job_ids,
        refused: s.refused,
    })
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register_node(
        &self,
        req: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeReply>, Status> {
        let r = req.into_inner();
        if r.node.is_empty() {
            return Err(Status::invalid_argument("node name is empty"));
        }
        if r.running.len() > MAX_HELD {
            return Err(Status::invalid_argument(format!(
                "{} running jobs listed; at most {MAX_HELD}",
                r.running.len()
            )));
        }
        let reg = Registration {
            node: r.node,
            roles: r.roles,
            cpus: r.cpus,
            gpus: r.gpus,
            slots: r.slots,
            incarnation: r.incarnation,
            running: r.running.into_iter().map(|h| (h.job_id, h.epoch)).collect(),
        };
        call_t!(
            current(&self.actor)?,
            |reply| CoordinatorMsg::Register { reg, reply },
            CALL_TIMEOUT_MS
        )
        .map_err(unavailable)?
        .map_err(Status::already_exists)?;
        Ok(Response::new(RegisterNodeReply {
            heartbeat_secs: self.heartbeat.as_secs(),
            lease_secs: self.lease.as_secs(),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let r = req.into_inner();
        if r.held.len() > MAX_HELD {
            return Err(Status::invalid_argument(format!(
                "{} held jobs listed; at most {MAX_HELD}",
                r.held.len()
            )));
        }
        let held = r.held.into_iter().map(|h| (h.job_id, h.epoch)).collect();
        let out = call_t!(
            current(&self.actor)?,
            |reply| CoordinatorMsg::Heartbeat {
                node: r.node,
                incarnation: r.incarnation,
                held,
                reply
            },
            CALL_TIMEOUT_MS
        )
        .map_err(unavailable)?
        .map_err(Status::unavailable)?;
        Ok(Response::new(HeartbeatReply {
            registered: out.registered,
            revoked: out.revoked,
            lease_secs: self.lease.as_secs(),
            admin_state: out.admin_state,
        }))
    }

    type WatchAssignmentsStream = ReceiverStream<Result<Assignment, Status>>;

    async fn watch_assignments(
        &self,
        req: Request<WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let r = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        call_t!(
            current(&self.actor)?,
            |reply| CoordinatorMsg::WatchAssignments {
                node: r.node,
                incarnation: r.incarnation,
                tx,
                reply
            },
            CALL_TIMEOUT_MS
        )
        .map_err(unavailable)?
        .map_err(Status::failed_precondition)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_checkpoint(
        &self,
        req: Request<CheckpointReport>,
    ) -> Result<Response<CheckpointAck>, Status> {
        let report = req.into_inner();
        let ack = call_t!(
            current(&self.actor)?,
            |reply| CoordinatorMsg::Report { report, reply },
            CALL_TIMEOUT_MS
        )
        .map_err(unavailable)?;
        Ok(Response::new(ack))
    }

    type WatchModelsStream = ReceiverStream<Result<ModelUpdate, Status>>;

    async fn watch_models(
        &self,
        _: Request<WatchModelsRequest>,
    ) -> Result<Response<Self::WatchModelsStream>, Status> {
        let (tx, rx) = mpsc::channel(256);
        current(&self.actor)?
            .cast(CoordinatorMsg::WatchModels { tx })
            .map_err(unavailable)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn start_training(
        &self,
        req: Request<StartTrainingRequest>,
    ) -> Result<Response<StartTrainingReply>, Status> {
        start_training(&current(&self.actor)?, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn report_progress(
        &self,
        req: Request<JobProgress>,
    ) -> Result<Response<ProgressAck>, Status> {
        current(&self.actor)?
            .cast(CoordinatorMsg::Progress(req.into_inner()))
            .map_err(unavailable)?;
        Ok(Response::new(ProgressAck {}))
    }

    async fn report_failure(
        &self,
        req: Request<JobFailure>,
    ) -> Result<Response<CheckpointAck>, Status> {
        let failure = req.into_inner();
        let ack = call_t!(
            current(&self.actor)?,
            |reply| CoordinatorMsg::Failure { failure, reply },
            CALL_TIMEOUT_MS
        )
        .map_err(unavailable)?;
        Ok(Response::new(ack))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<JobStatus>, Status> {
        let id = req.into_inner().job_id;
        let job = call_t!(
            current(&self.actor)?,
            |reply| CoordinatorMsg::GetJob {
                id: id.clone(),
                reply
            },
            CALL_TIMEOUT_MS
        )
        .map_err(unavailable)?;
        job.map(Response::new)
            .ok_or_else(|| Status::not_found(format!("unknown job `{id}`")))
    }
}

/// Serves the coordinator on `listener` until `shutdown` completes.
/// How the coordinator's gRPC port is served.
#[derive(Clone)]
pub struct ServeOptions {
    pub heartbeat: Duration,
    pub lease: Duration,
    /// Nodes must present it on every Coordinator call (`None`: open, only
    /// on loopback in embedded mode).
    pub cookie: Option<String>,
    /// Operators must present it on every Admin call.
    pub admin_token: String,
    /// The server side of a call's deadline (the shorter of this and the
    /// client's `grpc-timeout` applies).
    pub deadline: Duration,
    pub tls: Option<ServerTlsConfig>,
    pub db: Db,
}

/// Serves `Coordinator` (guarded by the cluster cookie), `Admin` (guarded
/// by the admin token), `grpc.health.v1` and reflection on `listener` until
/// `shutdown`. Requests are capped at 4 MiB. `health`'s reporter is the
/// coordinator actor's.
pub async fn serve(
    listener: TcpListener,
    actor: Slot<CoordinatorMsg>,
    o: ServeOptions,
    health: HealthServer<impl Health>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tickmesh_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor sets are valid");
    let coordinator = InterceptedService::new(
        CoordinatorServer::new(CoordinatorService {
            actor: actor.clone(),
            heartbeat: o.heartbeat,
            lease: o.lease,
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES),
        Guard::new(o.cookie.as_deref(), "cluster cookie"),
    );
    let admin = InterceptedService::new(
        AdminServer::new(AdminService::new(actor, o.db))
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        Guard::new(Some(&o.admin_token), "admin token"),
    );
    let mut b = tonic::transport::Server::builder()
        .timeout(o.deadline)
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .concurrency_limit_per_connection(256);
    if let Some(tls) = o.tls {
        b = b.tls_config(tls)?;
    }
    b.add_service(health)
        .add_service(reflection)
        .add_service(coordinator)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
