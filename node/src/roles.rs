//! Starts the roles of one node on connected adapters:
//!
//! - the mesh (a node with a `cluster_port`): its ractor_cluster server,
//!   its agent, a supervised link to each peer, and the watcher that closes
//!   sessions whose peer stopped answering (see [`crate::cluster`]);
//! - `coordinator`: `CoordinatorActor` (supervising its `StartModelConsumer`
//!   and its mesh port) and its gRPC server (Admin, health, reflection);
//! - `ingest`: a `Supervisor` with one consumer per ingest topic (bars on `h_alpaca` and `live_bars`,
//!   macro on `h_macrodata`, company on `h_company`), each on its share of the partitions;
//! - `aggregate`: `AggregatorActor` (driven by `tickmesh aggregate` and the demo);
//! - `train`: `TrainerPool` (and its mesh port), registered with the coordinator;
//! - `serve`: `PredictorSupervisor` (and its mesh port) and the HTTP API.
//!
//! All of them, the links and the gRPC and HTTP servers, are children of
//! one root [`Supervisor`] per node, restarted by the `[supervision]` policy.
//! [`Node::wait`] returns when the process is interrupted (Ok) or when the
//! root gives up (Err: the node must exit non-zero, saying why).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ractor::{Actor, ActorCell};
use tickmesh_aggregate::aggregator::{AggregatorActor, AggregatorArgs, AggregatorMsg};
use tickmesh_aggregate::live::{LiveAggregator, LiveArgs};
use tickmesh_coordinator::coordinator::{CoordinatorActor, CoordinatorArgs, CoordinatorMsg};
use tickmesh_core::config::{Backend, ClusterConfig, Role};
use tickmesh_ingest::consumer::ConsumerArgs;
use tickmesh_ingest::metrics::IngestMetrics;
use tickmesh_ingest::ownership::LeaseArgs;
use tickmesh_ingest::supervisor::{ingest_supervisor, INGEST_TOPICS};
use tickmesh_io::supervision::{
    ChildSpec, RestartBudget, ServerActor, ServerArgs, Slot, Supervisor, SupervisorArgs,
};
use tickmesh_io::Adapters;
use tickmesh_proto::auth::Link;
use tickmesh_serve::handle::{Limits, Table};
use tickmesh_serve::http::{HttpState, Readiness};
use tickmesh_serve::registry::{PredictorSupervisor, RegistryArgs, RegistryMsg};
use tickmesh_train::lease::Leases;
use tickmesh_train::pool::{TrainerPool, TrainerPoolArgs};
use tickmesh_train::trainer::TrainerArgs;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::info;

/// Listen addresses chosen at start (useful when the config says port 0).
#[derive(Debug, Clone, Default)]
pub struct Bound {
    pub coordinator: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// The node's `/metrics` and `/healthz` (`metrics_listen`).
    pub metrics: Option<SocketAddr>,
}

/// A running node: one root [`Supervisor`] (`node:NAME`, the
/// `[supervision]` policy) owning every role's top actor and every server,
/// in this order: the mesh links, coordinator, coordinator gRPC, ingest,
/// aggregate, train, serve (the predictor registry), forecast HTTP, the
/// node's metrics HTTP. Stopped in the reverse order.
pub struct Node {
    pub name: String,
    pub bound: Bound,
    pub ingest_metrics: IngestMetrics,
    /// The current incarnation of each role actor (restarts replace it).
    pub aggregator: Slot<AggregatorMsg>,
    pub coordinator: Slot<CoordinatorMsg>,
    pub registry: Slot<RegistryMsg>,
    /// The model handles forecasts read (a serve node's).
    pub models: Table,
    /// Set once the root supervisor runs every role (`/readyz`).
    pub ready: Readiness,
    /// The ractor_cluster node server, when the node has a `cluster_port`.
    pub mesh: Option<ractor::ActorRef<ractor_cluster::NodeServerMessage>>,
    root: Option<(ActorCell, JoinHandle<()>)>,
}

/// A server as a supervised child: it binds `addr` again on a restart (the
/// first run takes `first`, bound at start to learn the port).
fn server_child<F, Fut>(name: &'static str, first: TcpListener, run: F) -> Result<ChildSpec>
where
    F: Fn(TcpListener, std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let addr = first.local_addr()?;
    let first = Arc::new(std::sync::Mutex::new(Some(first)));
    let run = Arc::new(run);
    let args = ServerArgs::new(name, move |sd| {
        let first = first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let run = run.clone();
        async move {
            let listener = match first {
                Some(l) => l,
                None => TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("bind {addr} again: {e}"))?,
            };
            run(listener, sd).await
        }
    });
    Ok(ChildSpec::actor(name, ServerActor, move || args.clone()))
}

/// Starts `roles` as node `name` under its root supervisor.
pub async fn start(
    cfg: &ClusterConfig,
    name: &str,
    roles: &[Role],
    adapters: &Adapters,
) -> Result<Node> {
    tickmesh_io::telemetry::install();
    let mut node = Node {
        name: name.to_string(),
        bound: Bound::default(),
        ingest_metrics: IngestMetrics::default(),
        aggregator: Slot::default(),
        coordinator: Slot::default(),
        registry: Slot::default(),
        models: Table::new(cfg.retrain.drift_bars),
        ready: Readiness::default(),
        mesh: None,
        root: None,
    };
    let mut children = Vec::new();
    let mut coordinator_addr = cfg.coordinator.listen.clone();
    let nc = cfg.nodes.iter().find(|n| n.name == name);

    let mesh = match nc.and_then(|n| Some((n, n.cluster_port?))) {
        Some((nc, port)) => {
            let cookie = cfg
                .cluster
                .cookie
                .as_deref()
                .context("a node with a cluster_port needs cluster.cookie")?;
            let tls = crate::cluster::mesh_tls(cfg)?;
            let mesh =
                crate::cluster::start_server(name, cookie, &nc.host, port, tls.as_ref()).await?;
            for (peer, addr) in crate::cluster::peers(cfg, name, tls.is_some()) {
                info!(%peer, %addr, "linking to the mesh");
                let (mesh, tls) = (mesh.clone(), tls.clone());
                let child = format!("mesh link {peer}");
                let link = ServerArgs::new(child.clone(), move |sd| {
                    crate::cluster::link(mesh.clone(), peer.clone(), addr.clone(), tls.clone(), sd)
                });
                children.push(ChildSpec::actor(child, ServerActor, move || link.clone()));
            }
            let m = mesh.clone();
            let watch = ServerArgs::new("mesh sessions", move |sd| {
                crate::cluster::watch_sessions(m.clone(), sd)
            });
            children.push(ChildSpec::actor("mesh sessions", ServerActor, move || {
                watch.clone()
            }));
            Some(mesh)
        }
        None => None,
    };
    // On a mesh the cluster's scope; alone, one of the process's own.
    let scope = match &mesh {
        Some(_) => tickmesh_proto::mesh::Scope::new(&cfg.cluster.name),
        None => tickmesh_proto::mesh::Scope::local(),
    };

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
        let args = CoordinatorArgs {
            db: adapters.db.clone(),
            heartbeat: Duration::from_secs(cfg.coordinator.heartbeat_secs),
            lease: Duration::from_secs(cfg.coordinator.lease_secs),
            max_attempts: cfg.coordinator.max_attempts,
            retry_backoff: Duration::from_millis(cfg.coordinator.retry_backoff_ms),
            max_open_jobs: cfg.coordinator.max_open_jobs,
            promotion: cfg.promotion.clone(),
            retrain: cfg.retrain.clone(),
            intake: Some((adapters.bus.clone(), adapters.publisher.clone())),
            budget: RestartBudget::new(cfg.supervision.clone()),
            health: Some(health),
            scope: scope.clone(),
        };
        children.push(ChildSpec::actor_in(
            "coordinator",
            CoordinatorActor,
            move || args.clone(),
            Some(node.coordinator.clone()),
        ));
        let listener = TcpListener::bind(&cfg.coordinator.listen)
            .await
            .with_context(|| format!("bind coordinator.listen {}", cfg.coordinator.listen))?;
        let addr = listener.local_addr()?;
        coordinator_addr = addr.to_string();
        node.bound.coordinator = Some(addr);
        let opts = tickmesh_coordinator::grpc::ServeOptions {
            admin_token,
            deadline: admin_deadline(cfg),
            tls,
            db: adapters.db.clone(),
        };
        info!(%addr, tls = opts.tls.is_some(), "coordinator gRPC serving (Admin, health, reflection)");
        let slot = node.coordinator.clone();
        children.push(server_child("coordinator gRPC", listener, move |l, sd| {
            let (slot, opts, hs) = (slot.clone(), opts.clone(), health_server.clone());
            async move {
                tickmesh_coordinator::grpc::serve(l, slot, opts, hs, sd)
                    .await
                    .map_err(|e| format!("{e}{}", tickmesh_proto::auth::source_chain(&e)))
            }
        })?);
    }

    if roles.contains(&Role::Ingest) {
        let consumers = INGEST_TOPICS
            .iter()
            .map(|topic| ConsumerArgs {
                bus: adapters.bus.clone(),
                topic: (*topic).into(),
                group: "ingest".into(),
                // A cluster's ingest nodes split each topic's partitions by
                // lease; one embedded process reads its spool alone.
                leases: (cfg.cluster.backend == Backend::Distributed).then(|| LeaseArgs {
                    db: adapters.db.clone(),
                    member: name.to_string(),
                    ttl: Duration::from_secs(cfg.ingest.lease_secs),
                }),
                store: adapters.store.clone(),
                db: adapters.db.clone(),
                publisher: adapters.publisher.clone(),
                metrics: node.ingest_metrics.clone(),
                config: cfg.ingest.clone(),
            })
            .collect();
        let args = ingest_supervisor(consumers, cfg.supervision.clone())?;
        children.push(ChildSpec::actor("ingest", Supervisor, move || args.clone()));
    }

    if roles.contains(&Role::Aggregate) {
        let args = AggregatorArgs::of(
            cfg,
            nc.and_then(|n| n.cpus),
            adapters.store.clone(),
            adapters.db.clone(),
            adapters.publisher.clone(),
        )
        .automatic(cfg, name);
        if cfg.aggregate.live {
            let live = LiveArgs {
                bus: adapters.bus.clone(),
                aggregator: args.clone(),
                intervals: cfg.aggregate.intervals.clone(),
            };
            children.push(ChildSpec::actor(
                "aggregate-live",
                LiveAggregator,
                move || live.clone(),
            ));
        }
        children.push(ChildSpec::actor_in(
            "aggregate",
            AggregatorActor,
            move || args.clone(),
            Some(node.aggregator.clone()),
        ));
    }

    let device_setting = nc
        .and_then(|n| n.device.clone())
        .unwrap_or_else(|| cfg.train.device.clone());
    if device_setting.starts_with("cuda")
        && roles.contains(&Role::Train)
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
        let args = TrainerPoolArgs {
            node: name.to_string(),
            scope: scope.clone(),
            cpus,
            gpus,
            slots: (parallel * cfg.train.fuse_group_on(device.is_cuda())) as u32,
            computations: parallel as u32,
            trainer: TrainerArgs {
                db: adapters.db.clone(),
                store: adapters.store.clone(),
                train: cfg.train.clone(),
                features: cfg.features.clone(),
                device,
                // Replaced by each pool incarnation (see TrainerPool::pre_start).
                slots: Arc::new(Semaphore::new(parallel)),
                leases: Leases::default(),
            },
        };
        children.push(ChildSpec::actor("train", TrainerPool, move || args.clone()));
    }

    if roles.contains(&Role::Serve) {
        let args = RegistryArgs {
            node: name.to_string(),
            scope: scope.clone(),
            store: adapters.store.clone(),
            db: adapters.db.clone(),
            table: node.models.clone(),
            serve: cfg.serve.clone(),
            retrain: cfg.retrain.clone(),
            supervision: cfg.supervision.clone(),
        };
        children.push(ChildSpec::actor_in(
            "serve",
            PredictorSupervisor,
            move || args.clone(),
            Some(node.registry.clone()),
        ));
        let listener = TcpListener::bind(&cfg.serve.http_listen)
            .await
            .with_context(|| format!("bind serve.http_listen {}", cfg.serve.http_listen))?;
        let addr = listener.local_addr()?;
        node.bound.http = Some(addr);
        // POST /ml/train goes to Admin.Train with the caller's token.
        let link = coordinator_link(cfg, &coordinator_addr, None)?;
        let state = HttpState::new(
            node.models.clone(),
            Limits::new(cfg.serve.clone()),
            adapters.db.clone(),
            scope.clone(),
            node.ready.clone(),
        )
        .with_coordinator(&link);
        children.push(server_child("forecast HTTP", listener, move |l, sd| {
            let state = state.clone();
            async move {
                tickmesh_serve::http::serve(l, state, sd)
                    .await
                    .map_err(|e| e.to_string())
            }
        })?);
        info!(%addr, "forecast API serving");
    }

    if let Some(listen) = nc.and_then(|n| n.metrics_listen.as_ref()) {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("bind nodes.{name}.metrics_listen {listen}"))?;
        let addr = listener.local_addr()?;
        node.bound.metrics = Some(addr);
        let ready = node.ready.clone();
        children.push(server_child("metrics HTTP", listener, move |l, sd| {
            let ready = ready.clone();
            async move {
                tickmesh_serve::http::serve_node(l, ready, sd)
                    .await
                    .map_err(|e| e.to_string())
            }
        })?);
        info!(%addr, "metrics serving at /metrics");
    }

    if let Some(mesh) = &mesh {
        crate::cluster::start_agent(crate::cluster::NodeDescription {
            node: name.to_string(),
            roles: roles.iter().map(|r| r.as_str().to_string()).collect(),
            coordinator: node.bound.coordinator.map(|a| a.to_string()),
            http: node.bound.http.map(|a| a.to_string()),
            pid: std::process::id(),
        })
        .await?;
        node.mesh = Some(mesh.server.clone());
    }

    if !children.is_empty() {
        let (root, h) = Actor::spawn(
            None,
            Supervisor,
            SupervisorArgs {
                name: root_name(name),
                policy: cfg.supervision.clone(),
                children,
            },
        )
        .await
        .map_err(|e| anyhow!("node {name}: {e}"))?;
        node.root = Some((root.get_cell(), h));
    }
    node.ready.set();
    Ok(node)
}

fn root_name(node: &str) -> String {
    format!("node:{node}")
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
    if let Some(t) = embedded_token(cfg) {
        return Ok(t);
    }
    let path = cfg.embedded_token_path();
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
    embedded_token(cfg).ok_or_else(|| {
        anyhow!(
            "no admin token: set TICKMESH_ADMIN_TOKEN or [admin] token_file (an embedded coordinator keeps its own in {}, made when it starts)",
            cfg.embedded_token_path().display()
        )
    })
}

/// The token an embedded coordinator made, if there is one.
fn embedded_token(cfg: &ClusterConfig) -> Option<String> {
    let t = std::fs::read_to_string(cfg.embedded_token_path()).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Waits for SIGINT (ctrl-c) or SIGTERM.
async fn stop_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => Ok(r?),
        _ = term.recv() => Ok(()),
    }
}

impl Node {
    /// Waits for ctrl-c or SIGTERM (Ok) or for the root supervisor to give up (Err:
    /// the node must exit non-zero).
    pub async fn wait(&mut self) -> Result<()> {
        let Some((_, h)) = self.root.as_mut() else {
            return stop_signal().await;
        };
        tokio::select! {
            r = stop_signal() => r,
            _ = h => {
                // That handle has completed: stop() must not await it again.
                self.root = None;
                let why = tickmesh_io::supervision::metrics()
                    .last_escalation(&root_name(&self.name))
                    .unwrap_or_else(|| "its root supervisor stopped".into());
                Err(anyhow!("node {} gives up: {why}", self.name))
            }
        }
    }

    /// Stops every role and server, in the reverse of the order they
    /// started (the servers before the actors they front; the trainers and
    /// predictors before the coordinator they follow).
    pub async fn stop(self) {
        if let Some((root, h)) = self.root {
            root.stop(None);
            let _ = tokio::time::timeout(Duration::from_secs(30), h).await;
        }
        if let Some(m) = self.mesh {
            m.stop(None);
        }
    }
}
