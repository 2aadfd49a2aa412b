//! `tickmesh bench-control-plane`: the coordinator's placement and failover,
//! measured in one process against a real (SQLite or PostgreSQL) job table.
//! Simulated trainer nodes have a trainer port (in the `trainers` group),
//! register and heartbeat with the coordinator's port exactly as
//! `TrainerPool` does, but never train: the figures are the control
//! plane's alone. They share the coordinator's process, so the mesh's
//! encoding and network hop are not in these figures.
//!
//! - **Placement**: one `Admin.Train` (gRPC, loopback) for `jobs` tickers
//!   with aggregated data; the time until the last assignment reached its
//!   node, and each job's time from the request.
//! - **Failover**: `kills` times, a node holding jobs stops (its port
//!   leaves the group and its heartbeats end, as a SIGKILL ends its mesh
//!   session); the time until every one of its jobs reached another node. A killed node comes back (a new
//!   incarnation) once its name is free, so every kill finds a full node.
//!
//! scripts/bench/control_plane.sh runs it (release build).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use chrono::{TimeZone, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tickmesh_coordinator::coordinator::{CoordinatorActor, CoordinatorArgs};
use tickmesh_coordinator::grpc::{serve, ServeOptions};
use tickmesh_core::config::FeatureConfig;
use tickmesh_core::types::AggRow;
use tickmesh_core::types::Interval;
use tickmesh_io::db::Db;
use tickmesh_io::supervision::{RestartBudget, Slot};
use tickmesh_proto::auth::Link;
use tickmesh_proto::mesh::{
    self, CoordinatorPortMsg, Heartbeat, HeldJob, Register, TrainerPortMsg,
};
use tickmesh_proto::v1::admin_client::AdminClient;
use tickmesh_proto::v1::StartTrainingRequest;
use tokio::task::JoinHandle;

const ADMIN_TOKEN: &str = "bench-control-plane-admin-token";
const INTERVAL: Interval = Interval::D1;

#[derive(Debug, Clone)]
pub struct Options {
    pub jobs: usize,
    pub nodes: usize,
    pub kills: usize,
    pub heartbeat_secs: u64,
    pub lease_secs: u64,
    /// The coordinator's retry backoff (`coordinator.retry_backoff_ms`),
    /// which a job re-owned after a lost node waits too.
    pub retry_backoff_ms: u64,
    /// PostgreSQL instead of SQLite (the POSTGRES_* of `cfg`).
    pub db: Option<Db>,
}

/// Where each job is now: (node, epoch, when it arrived there).
type Placement = Arc<Mutex<HashMap<String, (String, i64, Instant)>>>;

/// A simulated trainer node: its port and heartbeats.
struct SimNode {
    port: ActorRef<TrainerPortMsg>,
    heartbeat: JoinHandle<()>,
}

impl SimNode {
    async fn kill(self) {
        self.heartbeat.abort();
        let _ = self.port.stop_and_wait(None, None).await;
    }
}

/// A simulated node's trainer port: records where each assignment landed.
struct SimPort;

impl Actor for SimPort {
    type Msg = TrainerPortMsg;
    type State = (String, Placement);
    type Arguments = (mesh::Scope, String, Placement);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (scope, name, placed): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        scope.join(mesh::TRAINERS, myself.get_cell());
        Ok((name, placed))
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        (name, placed): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let TrainerPortMsg::Assign(a) = msg;
        let a = a.into_result()?;
        placed
            .lock()
            .unwrap()
            .insert(a.job_id, (name.clone(), a.epoch, Instant::now()));
        Ok(())
    }
}

/// Starts `name`'s port and registers it (retrying while the name is
/// held), then heartbeats.
async fn start_node(
    scope: &mesh::Scope,
    name: &str,
    slots: u32,
    hb: Duration,
    placed: Placement,
) -> Result<SimNode> {
    let (port, _) = Actor::spawn(
        Some(scope.trainer_port(name)),
        SimPort,
        (scope.clone(), name.to_string(), placed.clone()),
    )
    .await?;
    let incarnation = rand::random::<u64>();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let req = Register {
            node: name.to_string(),
            roles: vec!["train".into()],
            cpus: 1,
            gpus: 0,
            incarnation,
            slots,
            running: Vec::new(),
        };
        let r = scope
            .ask(
                "register",
                |reply| CoordinatorPortMsg::Register(req.into(), reply),
                Duration::from_secs(30),
            )
            .await
            .and_then(|r| r);
        match r {
            Ok(_) => break,
            Err(e) if e.contains("already registered") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow!("register {name}: {e}")),
        }
    }
    let (n, scope) = (name.to_string(), scope.clone());
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(hb).await;
            let held: Vec<HeldJob> = placed
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, (node, _, _))| *node == n)
                .map(|(id, (_, epoch, _))| HeldJob {
                    job_id: id.clone(),
                    epoch: *epoch,
                })
                .collect();
            let req = Heartbeat {
                node: n.clone(),
                incarnation,
                held,
            };
            let _ = scope
                .ask(
                    "heartbeat",
                    |reply| CoordinatorPortMsg::Heartbeat(req.into(), reply),
                    Duration::from_secs(30),
                )
                .await;
        }
    });
    Ok(SimNode { port, heartbeat })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, mut xs: Vec<f64>) -> serde_json::Value {
    xs.sort_by(|a, b| a.total_cmp(b));
    serde_json::json!({
        "what": name,
        "n": xs.len(),
        "p50_s": percentile(&xs, 0.5),
        "p99_s": percentile(&xs, 0.99),
        "max_s": xs.last().copied().unwrap_or(f64::NAN),
    })
}

pub async fn run(o: Options) -> Result<Vec<serde_json::Value>> {
    let dir = tempfile::tempdir()?;
    let (db, backend) = match o.db.clone() {
        Some(db) => (db, "postgres"),
        None => (
            Db::open_sqlite(&dir.path().join("bench.db")).await?,
            "sqlite",
        ),
    };
    let tickers: Vec<String> = (0..o.jobs).map(|i| format!("CP{i:05}")).collect();
    let columns = FeatureConfig::default().columns();
    let row = AggRow {
        ts: Utc.with_ymd_and_hms(2024, 1, 2, 21, 0, 0).unwrap(),
        values: vec![Some(1.0); columns.len()],
    };
    for t in &tickers {
        db.load_aggregated(t, INTERVAL, &columns, std::slice::from_ref(&row))
            .await?;
    }
    let (hb, lease) = (
        Duration::from_secs(o.heartbeat_secs),
        Duration::from_secs(o.lease_secs),
    );
    let slot = Slot::default();
    let scope = mesh::Scope::local();
    let (coord, _) = Actor::spawn(
        None,
        CoordinatorActor,
        CoordinatorArgs {
            db: db.clone(),
            heartbeat: hb,
            lease,
            max_attempts: 1_000,
            retry_backoff: Duration::from_millis(o.retry_backoff_ms),
            max_open_jobs: o.jobs.max(1),
            // Simulated trainers report no model metrics: the gate would reject them.
            promotion: tickmesh_core::config::PromotionConfig {
                gate: false,
                ..Default::default()
            },
            retrain: Default::default(),
            intake: None,
            budget: RestartBudget::new(Default::default()),
            health: None,
            scope: scope.clone(),
        },
    )
    .await?;
    slot.set(coord.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (_, health) = tonic_health::server::health_reporter();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        slot,
        ServeOptions {
            admin_token: ADMIN_TOKEN.into(),
            deadline: Duration::from_secs(60),
            tls: None,
            db: db.clone(),
        },
        health,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let link = Link::plain(&addr.to_string(), Some(ADMIN_TOKEN));
    let placed: Placement = Arc::default();
    // Capacity for every job with one node down: a killed node's jobs fit elsewhere.
    let slots = (o.jobs.div_ceil(o.nodes.saturating_sub(1).max(1))) as u32;
    let mut nodes = Vec::new();
    for i in 0..o.nodes {
        let name = format!("sim-{i:02}");
        nodes.push(Some(
            start_node(&scope, &name, slots, hb, placed.clone()).await?,
        ));
    }

    // Placement.
    let mut client = AdminClient::new(
        link.connect(Duration::from_secs(10))
            .await
            .map_err(anyhow::Error::msg)?,
    );
    let t0 = Instant::now();
    let r = client
        .train(StartTrainingRequest {
            tickers: tickers.clone(),
            interval: INTERVAL.to_string(),
            model: String::new(),
            epochs: 0,
        })
        .await?
        .into_inner();
    if r.queued as usize != o.jobs {
        return Err(anyhow!(
            "{} of {} jobs queued: {:?}",
            r.queued,
            o.jobs,
            r.refused.first()
        ));
    }
    let accepted = t0.elapsed();
    loop {
        if placed.lock().unwrap().len() == o.jobs {
            break;
        }
        if t0.elapsed() > Duration::from_secs(600) {
            return Err(anyhow!("placement did not finish in 600 s"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let per_job: Vec<f64> = placed
        .lock()
        .unwrap()
        .values()
        .map(|(_, _, at)| at.duration_since(t0).as_secs_f64())
        .collect();
    let all = per_job.iter().cloned().fold(0.0, f64::max);
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for (n, _, _) in placed.lock().unwrap().values() {
        *per_node.entry(n.clone()).or_default() += 1;
    }
    let mut out = vec![serde_json::json!({
        "what": "placement",
        "backend": backend,
        "jobs": o.jobs,
        "nodes": o.nodes,
        "slots_per_node": slots,
        "request_s": accepted.as_secs_f64(),
        "all_placed_s": all,
        "jobs_per_s": o.jobs as f64 / all,
        "per_node_min": per_node.values().min(),
        "per_node_max": per_node.values().max(),
    })];
    out.push(summary("placement_per_job", per_job));

    // Failover.
    let mut failovers = Vec::new();
    for k in 0..o.kills {
        let i = k % o.nodes;
        let name = format!("sim-{i:02}");
        let victims: Vec<(String, i64)> = placed
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (n, _, _))| *n == name)
            .map(|(id, (_, e, _))| (id.clone(), *e))
            .collect();
        if victims.is_empty() {
            return Err(anyhow!("kill {k}: {name} holds no job"));
        }
        nodes[i].take().expect("running").kill().await;
        let killed = Instant::now();
        loop {
            let moved = {
                let p = placed.lock().unwrap();
                victims
                    .iter()
                    .all(|(id, e)| p.get(id).is_some_and(|(n, e2, _)| *n != name && e2 > e))
            };
            if moved {
                break;
            }
            if killed.elapsed() > Duration::from_secs(120) {
                return Err(anyhow!(
                    "kill {k}: {name}'s jobs were not re-owned in 120 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = killed.elapsed().as_secs_f64();
        eprintln!(
            "kill {k:>2}: {name}, {} jobs re-owned in {took:.2} s",
            victims.len()
        );
        failovers.push(took);
        // It comes back as a new process: empty, so the next kill finds others full.
        nodes[i] = Some(start_node(&scope, &name, slots, hb, placed.clone()).await?);
    }
    let mut f = summary("failover", failovers);
    f["lease_s"] = o.lease_secs.into();
    f["heartbeat_s"] = o.heartbeat_secs.into();
    f["retry_backoff_ms"] = o.retry_backoff_ms.into();
    out.push(f);
    for n in nodes.into_iter().flatten() {
        n.kill().await;
    }
    let _ = stop_tx.send(());
    let _ = server.await;
    coord.stop(None);
    Ok(out)
}
