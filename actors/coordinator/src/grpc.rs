//! The server of the coordinator's gRPC port: `Admin` (operators and
//! external clients; the admin token, see [`crate::admin`]),
//! `grpc.health.v1` and reflection, over TLS when configured. Nodes do not
//! use it: they talk to the coordinator on the mesh ([`crate::port`]).
//! Actor errors map to `tonic::Status` here and in `admin` only.
//!
//! [`CoordinatorActor`]: crate::coordinator::CoordinatorActor

use std::future::Future;
use std::time::Duration;

use ractor::{call_t, ActorRef};
use tickmesh_core::types::{validate_ticker, Interval};
use tickmesh_io::db::Db;
use tickmesh_io::supervision::Slot;
use tickmesh_proto::auth::Guard;
use tickmesh_proto::v1::admin_server::AdminServer;
use tickmesh_proto::v1::*;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;
use tonic::Status;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::admin::AdminService;
use crate::coordinator::CoordinatorMsg;
pub(crate) use crate::port::CALL_TIMEOUT_MS;

/// The largest request the Admin service decodes.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Tickers in one start request.
pub const MAX_TICKERS_PER_REQUEST: usize = 10_000;

pub(crate) fn unavailable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("coordinator actor: {e}"))
}

/// The coordinator actor's current incarnation.
pub(crate) fn current(slot: &Slot<CoordinatorMsg>) -> Result<ActorRef<CoordinatorMsg>, Status> {
    slot.get()
        .ok_or_else(|| Status::unavailable("the coordinator actor is starting"))
}

/// Validates a start request and queues its jobs (Admin.Train and Retrain).
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

/// How the coordinator's gRPC port is served.
#[derive(Clone)]
pub struct ServeOptions {
    /// Operators must present it on every Admin call.
    pub admin_token: String,
    /// The server side of a call's deadline (the shorter of this and the
    /// client's `grpc-timeout` applies).
    pub deadline: Duration,
    pub tls: Option<ServerTlsConfig>,
    pub db: Db,
}

/// Serves `Admin` (guarded by the admin token), `grpc.health.v1` and
/// reflection on `listener` until `shutdown`. Requests are capped at 4 MiB. `health`'s reporter is the
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
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
}
