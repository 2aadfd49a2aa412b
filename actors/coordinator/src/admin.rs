//! The tonic `tickmesh.v1.Admin` service: what operators and external
//! clients call, on the coordinator's gRPC port (see
//! [`crate::grpc::serve`]); every call has passed the admin token's guard.
//! Reads (jobs, models) go to the database; anything that changes the
//! cluster goes through the coordinator actor, which owns the state.

use ractor::call_t;
use tickmesh_core::types::{validate_ticker, Interval};
use tickmesh_io::db::{Db, JobRow, ModelVersion};
use tickmesh_io::supervision::Slot;
use tickmesh_proto::v1::admin_server::Admin;
use tickmesh_proto::v1::*;
use tonic::{Request, Response, Status};

use crate::coordinator::{AdminState, CoordinatorMsg};
use crate::grpc::{current, start_training, unavailable, CALL_TIMEOUT_MS};

/// Jobs one ListJobs returns at most.
const MAX_LIST: u32 = 10_000;

pub struct AdminService {
    actor: Slot<CoordinatorMsg>,
    db: Db,
}

impl AdminService {
    pub fn new(actor: Slot<CoordinatorMsg>, db: Db) -> Self {
        AdminService { actor, db }
    }
}

fn core_status(e: tickmesh_core::Error) -> Status {
    match e {
        tickmesh_core::Error::NotFound(m) => Status::not_found(m),
        tickmesh_core::Error::Invalid { .. } => Status::invalid_argument(e.to_string()),
        tickmesh_core::Error::Conflict(m) => Status::failed_precondition(m),
        e => Status::unavailable(e.to_string()),
    }
}

fn ticker_interval(ticker: &str, interval: &str) -> Result<(String, Interval), Status> {
    validate_ticker(ticker).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let i = interval
        .parse()
        .map_err(|e: tickmesh_core::Error| Status::invalid_argument(e.to_string()))?;
    Ok((ticker.to_string(), i))
}

fn model_info(m: &ModelVersion) -> ModelInfo {
    ModelInfo {
        ticker: m.ticker.clone(),
        interval: m.interval.to_string(),
        version: m.version,
        kind: m.kind.clone(),
        uri: m.uri.clone(),
        sha256: m.sha256.clone(),
        metrics_json: m.metrics.clone(),
        status: m.status.clone(),
        created_at: m.created_at.to_rfc3339(),
    }
}

/// A job row as the API shows it (the live progress is `GetJob`'s).
fn job_status(r: &JobRow) -> JobStatus {
    JobStatus {
        job_id: r.id.clone(),
        ticker: r.ticker.clone(),
        interval: r.interval.to_string(),
        state: r.state.clone(),
        model: r.model.clone().unwrap_or_default(),
        node: r.node.clone().unwrap_or_default(),
        epochs: r.epochs.unwrap_or(0) as u32,
        version: if r.state == "done" { r.version } else { 0 },
        metrics_json: r.metrics.clone(),
        reason: r.reason.clone(),
        attempts: r.attempts as u32,
        epoch: r.epoch,
        ..Default::default()
    }
}

fn node_name(n: &str) -> Result<String, Status> {
    if n.is_empty() || n.len() > 128 {
        return Err(Status::invalid_argument(
            "node name must be 1-128 characters",
        ));
    }
    Ok(n.to_string())
}

impl AdminService {
    async fn aggregation(&self, id: &str) -> Result<AggregationStatus, Status> {
        self.db
            .aggregate_request(id)
            .await
            .map_err(core_status)?
            .map(|r| aggregation_status(&r))
            .ok_or_else(|| Status::not_found(format!("no aggregation {id}")))
    }

    async fn set_state(&self, node: &str, state: AdminState) -> Result<NodeInfo, Status> {
        let node = node_name(node)?;
        call_t!(
            current(&self.actor)?,
            |reply| CoordinatorMsg::SetNodeState { node, state, reply },
            CALL_TIMEOUT_MS
        )
        .map_err(unavailable)?
        .map_err(|e| {
            if e.starts_with("unknown node") {
                Status::not_found(e)
            } else {
                Status::unavailable(e)
            }
        })
    }

    async fn change_champion(
        &self,
        ticker: &str,
        interval: &str,
        version: Option<i64>,
    ) -> Result<ModelInfo, Status> {
        let (ticker, interval) = ticker_interval(ticker, interval)?;
        let m = call_t!(
            current(&self.actor)?,
            |reply| CoordinatorMsg::ChangeChampion {
                ticker,
                interval,
                version,
                reply
            },
            CALL_TIMEOUT_MS
        )
        .map_err(unavailable)?
        .map_err(core_status)?;
        Ok(model_info(&m))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_nodes(
        &self,
        _: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesReply>, Status> {
        let nodes = call_t!(
            current(&self.actor)?,
            CoordinatorMsg::ListNodes,
            CALL_TIMEOUT_MS
        )
        .map_err(unavailable)?;
        Ok(Response::new(ListNodesReply { nodes }))
    }

    async fn list_jobs(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsReply>, Status> {
        let r = req.into_inner();
        if !r.ticker.is_empty() {
            validate_ticker(&r.ticker).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let limit = match r.limit {
            0 => 100,
            n if n > MAX_LIST => {
                return Err(Status::invalid_argument(format!(
                    "limit {n}: at most {MAX_LIST}"
                )))
            }
            n => n,
        };
        let ticker = (!r.ticker.is_empty()).then_some(r.ticker.as_str());
        let rows = self
            .db
            .recent_jobs(&r.states, ticker, limit as i64)
            .await
            .map_err(core_status)?;
        Ok(Response::new(ListJobsReply {
            jobs: rows.iter().map(job_status).collect(),
        }))
    }

    async fn list_models(
        &self,
        req: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsReply>, Status> {
        let r = req.into_inner();
        let (ticker, interval) = series_filter(&r.ticker, &r.interval)?;
        let models = self
            .db
            .models(ticker, interval, r.all_versions)
            .await
            .map_err(core_status)?;
        Ok(Response::new(ListModelsReply {
            models: models.iter().map(model_info).collect(),
        }))
    }

    async fn list_model_events(
        &self,
        req: Request<ListModelEventsRequest>,
    ) -> Result<Response<ListModelEventsReply>, Status> {
        let r = req.into_inner();
        let (ticker, interval) = series_filter(&r.ticker, &r.interval)?;
        let limit = match r.limit {
            0 => 50,
            n => n.min(MAX_LIST),
        };
        let events = self
            .db
            .model_events(ticker, interval, limit as i64)
            .await
            .map_err(core_status)?;
        Ok(Response::new(ListModelEventsReply {
            events: events
                .into_iter()
                .map(|e| ModelEvent {
                    ticker: e.ticker,
                    interval: e.interval.to_string(),
                    version: e.version,
                    kind: e.kind,
                    node: e.node,
                    detail: e.detail,
                    at: e.at.to_rfc3339(),
                })
                .collect(),
        }))
    }

    async fn train(
        &self,
        req: Request<StartTrainingRequest>,
    ) -> Result<Response<StartTrainingReply>, Status> {
        start_training(&current(&self.actor)?, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn retrain(
        &self,
        req: Request<RetrainRequest>,
    ) -> Result<Response<StartTrainingReply>, Status> {
        let r = req.into_inner();
        let (ticker, interval) = ticker_interval(&r.ticker, &r.interval)?;
        let champion = self
            .db
            .models(Some(&ticker), Some(interval), false)
            .await
            .map_err(core_status)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                Status::not_found(format!(
                    "{ticker} {interval} has no model to retrain; use Train"
                ))
            })?;
        start_training(
            &current(&self.actor)?,
            StartTrainingRequest {
                tickers: vec![ticker],
                interval: interval.to_string(),
                model: champion.kind,
                epochs: r.epochs,
            },
        )
        .await
        .map(Response::new)
    }

    async fn promote(&self, req: Request<PromoteRequest>) -> Result<Response<ModelInfo>, Status> {
        let r = req.into_inner();
        if r.version <= 0 {
            return Err(Status::invalid_argument("version must be at least 1"));
        }
        self.change_champion(&r.ticker, &r.interval, Some(r.version))
            .await
            .map(Response::new)
    }

    async fn rollback(&self, req: Request<RollbackRequest>) -> Result<Response<ModelInfo>, Status> {
        let r = req.into_inner();
        self.change_champion(&r.ticker, &r.interval, None)
            .await
            .map(Response::new)
    }

    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<NodeInfo>, Status> {
        let r = req.into_inner();
        self.set_state(&r.node, AdminState::Draining { handoff: r.handoff })
            .await
            .map(Response::new)
    }

    async fn cordon(&self, req: Request<CordonRequest>) -> Result<Response<NodeInfo>, Status> {
        let r = req.into_inner();
        let state = if r.uncordon {
            AdminState::Ready
        } else {
            AdminState::Cordoned
        };
        self.set_state(&r.node, state).await.map(Response::new)
    }

    async fn aggregate(
        &self,
        req: Request<StartAggregationRequest>,
    ) -> Result<Response<AggregationStatus>, Status> {
        let r = req.into_inner();
        for t in &r.tickers {
            validate_ticker(t).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let interval: Interval = r
            .interval
            .parse()
            .map_err(|e: tickmesh_core::Error| Status::invalid_argument(e.to_string()))?;
        let id = self
            .db
            .request_aggregation(&r.tickers, interval)
            .await
            .map_err(core_status)?;
        self.aggregation(&id).await.map(Response::new)
    }

    async fn get_aggregation(
        &self,
        req: Request<GetAggregationRequest>,
    ) -> Result<Response<AggregationStatus>, Status> {
        self.aggregation(&req.into_inner().id)
            .await
            .map(Response::new)
    }

    async fn list_aggregations(
        &self,
        req: Request<ListAggregationsRequest>,
    ) -> Result<Response<ListAggregationsReply>, Status> {
        let limit = match req.into_inner().limit {
            0 => 20,
            n if n > MAX_LIST => {
                return Err(Status::invalid_argument(format!(
                    "limit {n}: at most {MAX_LIST}"
                )))
            }
            n => n,
        };
        let rows = self
            .db
            .aggregations(limit as i64)
            .await
            .map_err(core_status)?;
        Ok(Response::new(ListAggregationsReply {
            aggregations: rows.iter().map(aggregation_status).collect(),
        }))
    }
}

fn aggregation_status(r: &tickmesh_io::db::AggregateRequest) -> AggregationStatus {
    AggregationStatus {
        id: r.id.clone(),
        trigger: r.trigger.clone(),
        tickers: r.tickers.clone(),
        interval: r.interval.to_string(),
        state: r.state.clone(),
        outcome: r.outcome.clone(),
        created_at: r.created_at.to_rfc3339(),
    }
}

/// The optional (ticker, interval) filter of a listing; empty means all.
fn series_filter<'a>(
    ticker: &'a str,
    interval: &str,
) -> Result<(Option<&'a str>, Option<Interval>), Status> {
    if !ticker.is_empty() {
        validate_ticker(ticker).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    let interval = match interval {
        "" => None,
        i => Some(
            i.parse()
                .map_err(|e: tickmesh_core::Error| Status::invalid_argument(e.to_string()))?,
        ),
    };
    Ok(((!ticker.is_empty()).then_some(ticker), interval))
}
