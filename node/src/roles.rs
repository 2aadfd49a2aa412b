//! Starts the roles of one node on connected adapters:
//!
//! - `coordinator`: `CoordinatorActor` (supervising its `StartModelConsumer`)
//!   and its gRPC server.
//! - `ingest`: a `Supervisor` with a `BarsConsumerActor` on `h_alpaca`.
//! - `aggregate`: `AggregatorActor` (driven by `tickmesh aggregate` and the demo).
//! - `train`: `TrainerPool`, registered with the coordinator.
//! - `serve`: `PredictorSupervisor`, the model watcher and the HTTP API.
//!
//! [`Node::wait`] returns when the process is interrupted (Ok) or when a
//! role's top actor stops on its own (Err: the node must exit non-zero).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ractor::{Actor, ActorCell, ActorRef};
use tickmesh_aggregate::aggregator::{AggregatorActor, AggregatorArgs, AggregatorMsg};
use tickmesh_coordinator::coordinator::{CoordinatorActor, CoordinatorArgs, CoordinatorMsg};
use tickmesh_core::config::{Backend, ClusterConfig, Role};
use tickmesh_core::supervision::RestartBudget;
use tickmesh_core::supervision::Supervisor;
use tickmesh_core::types::topics;
use tickmesh_core::Adapters;
use tickmesh_ingest::bars_consumer::BarsConsumerArgs;
use tickmesh_ingest::metrics::IngestMetrics;
use tickmesh_ingest::supervisor::ingest_supervisor;
use tickmesh_proto::auth::Link;
use tickmesh_serve::http::HttpState;
use tickmesh_serve::registry::{PredictorSupervisor, RegistryArgs, RegistryMsg};
use tickmesh_train::lease::Leases;
use tickmesh_train::pool::{TrainerPool, TrainerPoolArgs};
use tickmesh_train::trainer::TrainerArgs;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::info;

/// Listen addresses chosen at start (useful when the config says port 0).
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub coordinator: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

/// A running node.
pub struct Node {
    pub name: String,
    pub bound: Bound,
    pub ingest_metrics: IngestMetrics,
    pub aggregator: Option<ActorRef<AggregatorMsg>>,
    pub coordinator: Option<ActorRef<CoordinatorMsg>>,
    pub registry: Option<ActorRef<RegistryMsg>>,
    actors: Vec<(String, ActorCell, JoinHandle<()>)>,
    tasks: Vec<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    /// A server that stops before the node does says why here.
    server_stopped: (
        tokio::sync::mpsc::UnboundedSender<String>,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ),
}

impl Node {
    /// Runs a server until shutdown; if it ends first (an error, or a
    /// panic), the node stops with the reason.
    fn server<F>(&mut self, name: &'static str, server: F)
    where
        F: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let tx = self.server_stopped.0.clone();
        let task = tokio::spawn(server);
        self.tasks.push(tokio::spawn(async move {
            let why = match task.await {
                Ok(Ok(())) => "it stopped".to_string(),
                Ok(Err(e)) => e,
                Err(e) => format!("it panicked: {e}"),
            };
            tracing::error!(server = name, reason = %why, "server stopped");
            let _ = tx.send(format!("the {name} server stopped: {why}"));
        }));
    }
}

fn shutdown_signal(
    rx: &watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut rx = rx.clone();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}

/// Starts `roles` as node `name`.
pub async fn start(
    cfg: &ClusterConfig,
    name: &str,
    roles: &[Role],
    adapters: &Adapters,
) -> Result<Node> {
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut node = Node {
        name: name.to_string(),
        bound: Bound::default(),
        ingest_metrics: IngestMetrics::default(),
        aggregator: None,
        coordinator: None,
        registry: None,
        actors: Vec::new(),
        tasks: Vec::new(),
        shutdown,
        server_stopped: tokio::sync::mpsc::unbounded_channel(),
    };
    let mut coordinator_addr = cfg.coordinator.listen.clone();

    if roles.contains(&Role::Coordinator) {
        let admin_token = admin_token(cfg)?;
        let tls = match (
            &cfg.coordinator.tls_cert_file,
            &cfg.coordinator.tls_key_file,
        ) {
            (Some(c), Some(k)) => Some(
                tickmesh_proto::auth::server_tls(c, k)
                    .map_err(|e| anyhow!("coordinator.tls_cert_file/tls_key_file: {e}"))?,
            ),
            _ => None,
        };
        let (health, health_server) = tonic_health::server::health_reporter();
        let (actor, h) = Actor::spawn(
            None,
            CoordinatorActor,
            CoordinatorArgs {
                db: adapters.db.clone(),
                heartbeat: Duration::from_secs(cfg.coordinator.heartbeat_secs),
                lease: Duration::from_secs(cfg.coordinator.lease_secs),
                max_attempts: cfg.coordinator.max_attempts,
                retry_backoff: Duration::from_millis(cfg.coordinator.retry_backoff_ms),
                max_open_jobs: cfg.coordinator.max_open_jobs,
                intake: Some((adapters.bus.clone(), adapters.publisher.clone())),
                budget: RestartBudget::new(cfg.supervision.clone()),
                health: Some(health.clone()),
            },
        )
        .await?;
        let listener = TcpListener::bind(&cfg.coordinator.listen)
            .await
            .with_context(|| format!("bind coordinator.listen {}", cfg.coordinator.listen))?;
        let addr = listener.local_addr()?;
        coordinator_addr = addr.to_string();
        node.bound.coordinator = Some(addr);
        let opts = tickmesh_coordinator::grpc::ServeOptions {
            heartbeat: Duration::from_secs(cfg.coordinator.heartbeat_secs),
            lease: Duration::from_secs(cfg.coordinator.lease_secs),
            cookie: cfg.cluster.cookie.clone(),
            admin_token,
            deadline: admin_deadline(cfg),
            tls,
            db: adapters.db.clone(),
        };
        let tls_on = opts.tls.is_some();
        let a = actor.clone();
        let sd = shutdown_signal(&shutdown_rx);
        node.server("coordinator gRPC", async move {
            tickmesh_coordinator::grpc::serve(listener, a, opts, health_server, sd)
                .await
                .map_err(|e| format!("{e}: {}", error_chain(&e)))
        });
        info!(%addr, tls = tls_on, cookie = cfg.cluster.cookie.is_some(), "coordinator gRPC serving (Coordinator, Admin, health, reflection)");
        node.actors
            .push(("coordinator".into(), actor.get_cell(), h));
        node.coordinator = Some(actor);
    }

    if roles.contains(&Role::Ingest) {
        let consumer = BarsConsumerArgs {
            bus: adapters.bus.clone(),
            topic: topics::BARS.into(),
            group: "ingest".into(),
            store: adapters.store.clone(),
            publisher: adapters.publisher.clone(),
            metrics: node.ingest_metrics.clone(),
        };
        let (sup, h) = Actor::spawn(
            None,
            Supervisor,
            ingest_supervisor(vec![consumer], cfg.supervision.clone()),
        )
        .await?;
        node.actors.push(("ingest".into(), sup.get_cell(), h));
    }

    if roles.contains(&Role::Aggregate) {
        let (agg, h) = Actor::spawn(
            None,
            AggregatorActor,
            AggregatorArgs {
                store: adapters.store.clone(),
                db: adapters.db.clone(),
                publisher: adapters.publisher.clone(),
            },
        )
        .await?;
        node.actors.push(("aggregate".into(), agg.get_cell(), h));
        node.aggregator = Some(agg);
    }

    let nc = cfg.nodes.iter().find(|n| n.name == name);
    let device_setting = nc
        .and_then(|n| n.device.clone())
        .unwrap_or_else(|| cfg.train.device.clone());
    if device_setting.starts_with("cuda")
        && (roles.contains(&Role::Train) || roles.contains(&Role::Serve))
        && !tch::Cuda::is_available()
    {
        return Err(anyhow!(
            "node {name}: device \"{device_setting}\" but no CUDA device is available to this libtorch (run `tickmesh doctor`); use \"auto\" or \"cpu\""
        ));
    }
    let device = tickmesh_model::device(&device_setting);
    if let tch::Device::Cuda(i) = device {
        let n = tch::Cuda::device_count() as usize;
        if i >= n {
            return Err(anyhow!(
                "node {name}: device cuda:{i} but this machine has {n} CUDA device(s)"
            ));
        }
    }
    if roles.contains(&Role::Train) {
        let cpus = nc.and_then(|n| n.cpus).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        });
        let gpus = nc.map(|n| n.gpus).unwrap_or(0);
        // Slots: the node's `jobs`, else `jobs_per_gpu` per GPU on CUDA, else `cpu_jobs`.
        let parallel = nc.and_then(|n| n.jobs).unwrap_or(if device.is_cuda() {
            cfg.train.jobs_per_gpu * gpus.max(1) as usize
        } else {
            cfg.train.cpu_jobs
        });
        let (pool, h) = Actor::spawn(
            None,
            TrainerPool,
            TrainerPoolArgs {
                node: name.to_string(),
                coordinator: coordinator_link(
                    cfg,
                    &coordinator_addr,
                    cfg.cluster.cookie.as_deref(),
                )?,
                cpus,
                gpus,
                slots: parallel as u32,
                trainer: TrainerArgs {
                    db: adapters.db.clone(),
                    store: adapters.store.clone(),
                    train: cfg.train.clone(),
                    device,
                    slots: Arc::new(Semaphore::new(parallel)),
                    leases: Leases::default(),
                },
            },
        )
        .await
        .map_err(|e| anyhow!("train role: {e}"))?;
        node.actors.push(("train".into(), pool.get_cell(), h));
    }

    if roles.contains(&Role::Serve) {
        let (registry, h) = Actor::spawn(
            None,
            PredictorSupervisor,
            RegistryArgs {
                store: adapters.store.clone(),
                db: adapters.db.clone(),
                device,
            },
        )
        .await?;
        let listener = TcpListener::bind(&cfg.serve.http_listen)
            .await
            .with_context(|| format!("bind serve.http_listen {}", cfg.serve.http_listen))?;
        let addr = listener.local_addr()?;
        node.bound.http = Some(addr);
        let link = coordinator_link(cfg, &coordinator_addr, cfg.cluster.cookie.as_deref())?;
        let state = HttpState::new(registry.clone(), cfg.serve.max_steps)
            .with_coordinator(&link)
            .map_err(|e| anyhow!("serve role: {e}"))?;
        let sd = shutdown_signal(&shutdown_rx);
        node.server("forecast HTTP", async move {
            tickmesh_serve::http::serve(listener, state, sd)
                .await
                .map_err(|e| e.to_string())
        });
        node.tasks
            .push(tokio::spawn(tickmesh_serve::watch::follow_models(
                link,
                name.to_string(),
                registry.clone(),
            )));
        info!(%addr, "forecast API serving");
        node.actors.push(("serve".into(), registry.get_cell(), h));
        node.registry = Some(registry);
    }
    Ok(node)
}

/// `: cause: cause…` of an error's sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut s = e.source();
    while let Some(c) = s {
        out.push(c.to_string());
        s = c.source();
    }
    out.join(": ")
}

/// How this process reaches the coordinator's gRPC port at `addr`: with
/// `secret` (the cluster cookie, or the admin token) and, when the port
/// speaks TLS, the configured CA and name.
pub fn coordinator_link(cfg: &ClusterConfig, addr: &str, secret: Option<&str>) -> Result<Link> {
    let mut link = Link::plain(addr, secret);
    if let Some(ca) = &cfg.coordinator.tls_ca_file {
        let domain = cfg.coordinator.tls_domain.clone().unwrap_or_else(|| {
            addr.rsplit_once(':')
                .map_or(addr, |(h, _)| h)
                .trim_matches(['[', ']'])
                .to_string()
        });
        link = link
            .with_tls(ca, &domain)
            .map_err(|e| anyhow!("coordinator.tls_ca_file: {e}"))?;
    }
    Ok(link)
}

/// The deadline of an admin call (`[admin] deadline_secs`, default 30 s).
pub fn admin_deadline(cfg: &ClusterConfig) -> Duration {
    Duration::from_secs(cfg.admin.deadline_secs.unwrap_or(30))
}

/// The admin token a coordinator guards `Admin` with: the configured one;
/// in embedded mode without one, the token in `{data_dir}/admin.token`
/// (made on first start, readable by its owner only). A distributed
/// coordinator without a token does not start.
pub fn admin_token(cfg: &ClusterConfig) -> Result<String> {
    if let Some(t) = cfg.admin_token()? {
        return Ok(t);
    }
    if cfg.cluster.backend == Backend::Distributed {
        return Err(anyhow!(
            "no admin token: a distributed coordinator needs one for tickmesh.v1.Admin (set TICKMESH_ADMIN_TOKEN or [admin] token_file)"
        ));
    }
    let path = cfg.embedded_token_path();
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let token: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    write_private(&path, &token).with_context(|| format!("write {}", path.display()))?;
    info!(path = %path.display(), "made an admin token for this embedded cluster");
    Ok(token)
}

/// Writes `text` to a new file only its owner can read.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The admin token `tickmesh admin` presents: the configured one, else an
/// embedded coordinator's token file.
pub fn client_admin_token(cfg: &ClusterConfig) -> Result<String> {
    if let Some(t) = cfg.admin_token()? {
        return Ok(t);
    }
    let path = cfg.embedded_token_path();
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_string()),
        _ => Err(anyhow!(
            "no admin token: set TICKMESH_ADMIN_TOKEN or [admin] token_file (an embedded coordinator keeps its own in {}, made when it starts)",
            path.display()
        )),
    }
}

impl Node {
    /// Waits for ctrl-c (Ok) or for a role to stop on its own (Err).
    pub async fn wait(&mut self) -> Result<()> {
        if self.actors.is_empty() {
            tokio::signal::ctrl_c().await?;
            return Ok(());
        }
        let names: Vec<String> = self.actors.iter().map(|(n, _, _)| n.clone()).collect();
        let handles = self.actors.iter_mut().map(|(_, _, h)| h);
        tokio::select! {
            r = tokio::signal::ctrl_c() => Ok(r?),
            Some(why) = self.server_stopped.1.recv() => Err(anyhow!("{why}; the node exits")),
            (_, i, _) = futures::future::select_all(handles) => {
                // That handle has completed: stop() must not await it again.
                self.actors.remove(i);
                Err(anyhow!("role `{}` stopped; the node exits", names[i]))
            }
        }
    }

    /// Stops every role, in the reverse of the order they started (the
    /// trainers and predictors before the coordinator they follow), then the
    /// servers.
    pub async fn stop(self) {
        for (_, cell, _) in self.actors.iter().rev() {
            cell.stop(None);
        }
        for (_, _, h) in self.actors.into_iter().rev() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            t.abort();
        }
    }
}
