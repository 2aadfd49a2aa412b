//! `cluster.toml`: the typed configuration of a tickmesh cluster.
//!
//! Parsed with `deny_unknown_fields`, defaults in one place ([`Default`]
//! impls), then overridden from the environment with the original stack's
//! variable names (`POSTGRES_*`, `S3_ENDPOINT_URL`, `S3_ACCESS_KEY`,
//! `S3_SECRET_KEY`, plus `KAFKA_BOOTSTRAP_SERVERS`), then validated. Every
//! error names the file and the key. The environment is passed in as a map so
//! tests never touch the process environment.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where the shared services come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Files in `data/raw/`, a local object directory, SQLite.
    #[default]
    Embedded,
    /// Kafka, S3, PostgreSQL.
    Distributed,
}

/// A role a node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Coordinator,
    Ingest,
    Aggregate,
    Train,
    Serve,
}

impl Role {
    /// The role's name as `cluster.toml` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Ingest => "ingest",
            Role::Aggregate => "aggregate",
            Role::Train => "train",
            Role::Serve => "serve",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub name: String,
    pub backend: Backend,
    /// Shared secret of the cluster: the ractor_cluster mesh's cookie, which
    /// every node proves before it may send or receive anything. No
    /// default: required in distributed mode and by nodes with a
    /// `cluster_port`. `TICKMESH_COOKIE` overrides it.
    pub cookie: Option<String>,
    /// PEM certificate chain and key every node's mesh server presents: the
    /// mesh speaks TLS only. Both or neither, and `tls_ca_file` with them.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// The CA every node verifies its mesh peers with.
    pub tls_ca_file: Option<PathBuf>,
    /// The name in the nodes' certificates (default: each peer's host).
    pub tls_domain: Option<String>,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            name: "tickmesh".into(),
            backend: Backend::Embedded,
            cookie: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_domain: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Prefix for every topic name (isolates tests and tenants).
    pub topic_prefix: String,
    /// Consumer group id prefix; the role name is appended.
    pub group_id: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:19092".into(),
            topic_prefix: String::new(),
            group_id: "tickmesh".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    pub endpoint_url: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    /// Prefix for every bucket name.
    pub bucket_prefix: String,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint_url: "http://127.0.0.1:19000".into(),
            access_key: "tickmesh".into(),
            secret_key: "tickmesh-secret".into(),
            region: "us-east-1".into(),
            bucket_prefix: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    pub host: String,
    pub port: u16,
    pub db: String,
    pub user: String,
    pub password: String,
    pub max_connections: u32,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            host: "127.0.0.1".into(),
            port: 15432,
            db: "tickmesh".into(),
            user: "tickmesh".into(),
            password: "tickmesh".into(),
            max_connections: 8,
        }
    }
}

impl PostgresConfig {
    pub fn url(&self) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            self.user, self.password, self.host, self.port, self.db
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedConfig {
    /// Root of the embedded mode's state: `raw/` (the message spool),
    /// `store/` (the object store) and `tickmesh.db` (SQLite).
    pub data_dir: PathBuf,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            data_dir: PathBuf::from("data"),
        }
    }
}

impl EmbeddedConfig {
    pub fn raw_dir(&self) -> PathBuf {
        self.data_dir.join("raw")
    }
    pub fn store_dir(&self) -> PathBuf {
        self.data_dir.join("store")
    }
    pub fn sqlite_path(&self) -> PathBuf {
        self.data_dir.join("tickmesh.db")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC listen address of the coordinator's Admin API (nodes reach the
    /// coordinator on the mesh, through its node's `cluster_port`).
    pub listen: String,
    pub heartbeat_secs: u64,
    /// A job's lease: a trainer that has not renewed it for this long stops
    /// writing, and the coordinator then hands the job to another node.
    pub lease_secs: u64,
    /// Attempts of a job (failures and lost leases) before it is marked failed.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each further one (with jitter).
    pub retry_backoff_ms: u64,
    /// Jobs queued or running at most; a request beyond it is refused.
    pub max_open_jobs: usize,
    /// PEM certificate chain and key: the gRPC port (Admin, health,
    /// reflection) speaks TLS only. Both or neither.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA that clients (serve nodes' `/ml/train`, `tickmesh admin`) verify the coordinator
    /// with; with TLS on and no CA, the system roots are not used: set it.
    pub tls_ca_file: Option<PathBuf>,
    /// The name in the coordinator's certificate (default: the host of `listen`).
    pub tls_domain: Option<String>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            listen: "127.0.0.1:50051".into(),
            heartbeat_secs: 5,
            lease_secs: 30,
            max_attempts: 3,
            retry_backoff_ms: 1_000,
            max_open_jobs: 10_000,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_domain: None,
        }
    }
}

/// `[admin]`: the operators' gRPC API (`tickmesh.v1.Admin`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// A file holding the bearer token (surrounding whitespace ignored).
    /// `TICKMESH_ADMIN_TOKEN` takes precedence. A distributed coordinator
    /// refuses to start without a token; an embedded one makes one and
    /// keeps it in `{embedded.data_dir}/admin.token`.
    pub token_file: Option<PathBuf>,
    /// Seconds an admin call may take (server and CLI) before it is cancelled.
    pub deadline_secs: Option<u64>,
    /// The token from `TICKMESH_ADMIN_TOKEN` (never read from the file).
    #[serde(skip)]
    pub token_env: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// HTTP listen address of the forecast API.
    pub http_listen: String,
    /// Largest `n_steps` a forecast request may ask for.
    pub max_steps: usize,
    /// Forecast computations running at once on the node (0: its cores).
    pub compute_slots: usize,
    /// Forecast requests in flight on the node (computing or waiting);
    /// beyond it a request gets `503` with `Retry-After`.
    pub max_queue: usize,
    /// Forecast requests in flight for one (ticker, interval); beyond it
    /// a request gets `429` with `Retry-After`.
    pub max_per_model: usize,
    /// A forecast request not answered within this gets `503` (and its
    /// computation stops if nobody else waits for it).
    pub request_timeout_ms: u64,
    /// The stored rows a forecast starts from are re-read at most this often.
    pub history_refresh_ms: u64,
    /// Concurrent requests for the same model and data share one
    /// computation, and its result answers later ones until either changes.
    pub coalesce: bool,
    /// A model version whose load failed for a passing reason (the store or
    /// the database unreachable) is tried again after this, doubling...
    pub load_retry_ms: u64,
    /// ...up to this.
    pub load_retry_max_ms: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            http_listen: "127.0.0.1:8080".into(),
            max_steps: 500,
            compute_slots: 0,
            max_queue: 1024,
            max_per_model: 256,
            request_timeout_ms: 10_000,
            history_refresh_ms: 1_000,
            coalesce: true,
            load_retry_ms: 1_000,
            load_retry_max_ms: 60_000,
        }
    }
}

impl ServeConfig {
    /// The forecast computations that may run at once.
    pub fn compute_slots(&self) -> usize {
        if self.compute_slots > 0 {
            self.compute_slots
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// `[aggregate]`: when the aggregate role runs on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregateConfig {
    /// The intervals an automatic run aggregates, each run publishing its
    /// own `start_model`.
    pub intervals: Vec<crate::types::Interval>,
    /// Aggregate the active tickers whose ingest watermark moved past what
    /// their series last consumed.
    pub on_ingest: bool,
    /// How long the watermarks must stand still before such a run, so the
    /// batches of one delivery make one run.
    pub settle_secs: u64,
    /// Every this many seconds, aggregate every active ticker (0: never).
    pub schedule_secs: u64,
    /// How often the role looks at the watermarks and the Admin API's requests.
    pub poll_ms: u64,
    /// How long an aggregate node holds a claimed Admin API request before
    /// another may take it over (a node that died mid-run).
    pub request_lease_secs: u64,
    /// After a failed automatic run, the wait before the next try (doubling
    /// up to 64 times this).
    pub retry_secs: u64,
    /// Live mode: each bar on `live_bars` advances the indicators of its
    /// series in `intervals` and appends the rows of the buckets it completes.
    pub live: bool,
}

impl Default for AggregateConfig {
    fn default() -> Self {
        AggregateConfig {
            intervals: vec![crate::types::Interval::D1],
            on_ingest: true,
            settle_secs: 5,
            schedule_secs: 0,
            poll_ms: 1000,
            request_lease_secs: 600,
            retry_secs: 10,
            live: false,
        }
    }
}

impl AggregateConfig {
    fn check(&self) -> std::result::Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((format!("aggregate.{k}"), m.to_string()));
        if self.intervals.is_empty() {
            return bad("intervals", "must list at least one interval");
        }
        if self.poll_ms < 10 || self.poll_ms > 3_600_000 {
            return bad("poll_ms", "must be 10 ..= 3600000");
        }
        if self.request_lease_secs == 0 {
            return bad("request_lease_secs", "must be at least 1");
        }
        if self.retry_secs == 0 {
            return bad("retry_secs", "must be at least 1");
        }
        Ok(())
    }
}

/// The ingest role's consumers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// A message larger than this goes to the dead-letter topic unread
    /// (at most [`crate::types::MAX_MESSAGE_BYTES`]).
    pub max_message_bytes: usize,
    /// Records taken from the bus at most per batch; a batch's records are
    /// grouped by object, each object written once, then the batch's offsets
    /// committed.
    pub batch_records: usize,
    /// Objects written at once (S3 requests in flight per consumer).
    pub write_concurrency: usize,
    /// How long an ingest node's membership and partition leases last
    /// without renewal (a cluster's nodes take partitions by lease): a
    /// killed node's partitions move after about this long.
    pub lease_secs: u64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_message_bytes: 8 * 1024 * 1024,
            batch_records: 256,
            write_concurrency: 16,
            lease_secs: 10,
        }
    }
}

/// A model architecture, by the name cluster.toml, the CLI and the API use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// LSTM with additive attention over the window (the default).
    #[default]
    LstmAttention,
    /// GRU, read out from the last hidden state.
    Gru,
    /// A 1-D convolution over the window feeding an LSTM.
    CnnLstm,
}

impl ModelKind {
    pub const ALL: [ModelKind; 3] = [ModelKind::LstmAttention, ModelKind::Gru, ModelKind::CnnLstm];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::LstmAttention => "lstm_attention",
            ModelKind::Gru => "gru",
            ModelKind::CnnLstm => "cnn_lstm",
        }
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ModelKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ModelKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "model",
                    format!("`{s}` is not a model kind (lstm_attention, gru, cnn_lstm)"),
                )
            })
    }
}

/// Training hyperparameters (defaults for every ticker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Model kind: `lstm_attention`, `gru` or `cnn_lstm`.
    pub model: ModelKind,
    pub features: Vec<String>,
    pub seq_len: usize,
    pub hidden: i64,
    pub layers: i64,
    /// Output channels of `cnn_lstm`'s convolution.
    pub conv_channels: i64,
    /// Kernel width of `cnn_lstm`'s convolution (odd: the window keeps its length).
    pub kernel_size: i64,
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    /// Largest L2 norm of the gradient per Adam step (clipped above it).
    pub clip_grad_norm: f64,
    /// Fraction of the windows (after the training ones) that validate: early
    /// stopping selects on them.
    pub val_fraction: f64,
    /// Fraction of the windows (the most recent) held out for the test
    /// metrics; never seen by training or early stopping.
    pub test_fraction: f64,
    /// Epochs without validation improvement before stopping early.
    pub patience: usize,
    /// `auto` (CUDA when present), `cpu` or `cuda`.
    pub device: String,
    /// Jobs a trainer node runs at once on one CUDA device.
    pub jobs_per_gpu: usize,
    /// Jobs a trainer node runs at once on the CPU.
    pub cpu_jobs: usize,
    pub seed: i64,
    /// A cluster trainer saves a resumable snapshot (weights, Adam's moments,
    /// counters) after every this many epochs, so a job handed to another
    /// node goes on from there; 0: never.
    pub snapshot_every: usize,
    /// A cluster job for a (ticker, interval) that has a champion of the
    /// same architecture (kind, features, window and sizes) starts from the
    /// champion's weights instead of the seeded initialisation.
    pub warm_start: bool,
    /// Jobs of one kind and shape a trainer node on a CUDA device trains
    /// as one fused computation at most (1: every job alone). A node takes
    /// this many jobs per training slot.
    pub fuse_group: usize,
    /// The same on the CPU. 1 by default (off): fused training on the CPU
    /// measured 1.3–5.5× one model at a time (BENCHMARKS.md,
    /// `scripts/bench/fused.sh`), but a node then takes this many times its
    /// jobs, which the coordinator can no longer place on other nodes.
    pub cpu_fuse_group: usize,
    /// Estimated device memory one fused group may use; a larger set of
    /// jobs is split into groups that fit.
    pub fuse_memory_mb: usize,
    /// How long a trainer node waits after an assignment for more jobs to
    /// fuse with.
    pub fuse_wait_ms: u64,
}

impl TrainConfig {
    /// The largest fused group on a CUDA device (`cuda`) or on the CPU.
    pub fn fuse_group_on(&self, cuda: bool) -> usize {
        if cuda {
            self.fuse_group
        } else {
            self.cpu_fuse_group
        }
        .max(1)
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: ModelKind::LstmAttention,
            features: vec![
                "close".into(),
                "log_return".into(),
                "sma_20".into(),
                "rsi_14".into(),
            ],
            seq_len: 30,
            hidden: 32,
            layers: 1,
            conv_channels: 32,
            kernel_size: 3,
            epochs: 30,
            batch_size: 64,
            learning_rate: 1e-3,
            clip_grad_norm: 1.0,
            val_fraction: 0.15,
            test_fraction: 0.15,
            patience: 5,
            device: "auto".into(),
            jobs_per_gpu: 4,
            cpu_jobs: 1,
            seed: 42,
            snapshot_every: 5,
            warm_start: true,
            fuse_group: 16,
            cpu_fuse_group: 1,
            fuse_memory_mb: 4096,
            fuse_wait_ms: 250,
        }
    }
}

impl TrainConfig {
    /// Checks the hyperparameters; the error is `(key, message)` with the key
    /// under `train.`.
    /// `columns` are those of `aggregated_data` (the features may be any of them).
    pub fn check(&self, columns: &[String]) -> std::result::Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((format!("train.{k}"), m));
        let t = self;
        if t.features.is_empty() {
            return bad("features", "must name at least one feature".into());
        }
        if let Some(f) = t.features.iter().find(|f| !columns.contains(f)) {
            return bad(
                "features",
                format!("`{f}` is not a feature column ({})", columns.join(", ")),
            );
        }
        if !t.features.iter().any(|f| f == "close") {
            return bad("features", "must include `close`, the target".into());
        }
        let mut seen = BTreeSet::new();
        if let Some(f) = t.features.iter().find(|f| !seen.insert(f.as_str())) {
            return bad("features", format!("`{f}` is listed twice"));
        }
        if t.seq_len < 2 {
            return bad("seq_len", "must be at least 2".into());
        }
        if t.hidden < 1 || t.layers < 1 {
            return bad("hidden", "hidden and layers must be at least 1".into());
        }
        if t.conv_channels < 1 {
            return bad("conv_channels", "must be at least 1".into());
        }
        if t.kernel_size < 1 || t.kernel_size % 2 == 0 {
            return bad("kernel_size", "must be an odd number of at least 1".into());
        }
        for (k, v) in [
            ("fuse_group", t.fuse_group),
            ("cpu_fuse_group", t.cpu_fuse_group),
        ] {
            if v == 0 || v > 1024 {
                return bad(k, format!("{v} must be in 1..=1024"));
            }
        }
        if t.fuse_memory_mb == 0 {
            return bad("fuse_memory_mb", "must be at least 1".into());
        }
        if t.fuse_wait_ms > 60_000 {
            return bad(
                "fuse_wait_ms",
                format!("{} must be at most 60000", t.fuse_wait_ms),
            );
        }
        if t.epochs == 0 || t.batch_size == 0 {
            return bad("epochs", "epochs and batch_size must be at least 1".into());
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return bad("learning_rate", "must be a positive number".into());
        }
        if !(t.clip_grad_norm.is_finite() && t.clip_grad_norm > 0.0) {
            return bad("clip_grad_norm", "must be a positive number".into());
        }
        for (k, v) in [
            ("val_fraction", t.val_fraction),
            ("test_fraction", t.test_fraction),
        ] {
            if !(v > 0.0 && v <= 0.4) {
                return bad(k, format!("{v} must be in (0, 0.4]"));
            }
        }
        if !valid_device(&t.device) {
            return bad(
                "device",
                format!("`{}` is not one of auto, cpu, cuda, cuda:N", t.device),
            );
        }
        if t.jobs_per_gpu == 0 || t.cpu_jobs == 0 {
            return bad(
                "jobs_per_gpu",
                "jobs_per_gpu and cpu_jobs must be at least 1".into(),
            );
        }
        Ok(())
    }
}

/// How a supervisor restarts its children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    #[default]
    OneForOne,
    OneForAll,
    RestForOne,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    pub strategy: Strategy,
    pub max_restarts: u32,
    pub window_secs: u64,
    pub backoff_ms: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            strategy: Strategy::OneForOne,
            max_restarts: 3,
            window_secs: 10,
            backoff_ms: 200,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    pub roles: Vec<Role>,
    #[serde(default)]
    pub cpus: Option<u32>,
    #[serde(default)]
    pub gpus: u32,
    /// Host the node runs on (its ractor_cluster address).
    #[serde(default = "default_host")]
    pub host: String,
    /// Port of the node's ractor_cluster server; without it the node stays
    /// out of the mesh.
    #[serde(default)]
    pub cluster_port: Option<u16>,
    /// This node's training device (`auto`, `cpu`, `cuda`, `cuda:N`);
    /// default: `train.device`.
    #[serde(default)]
    pub device: Option<String>,
    /// Training jobs this node runs at once; default: `train.jobs_per_gpu`
    /// per GPU on a CUDA device, else `train.cpu_jobs`.
    #[serde(default)]
    pub jobs: Option<usize>,
    /// Where this node serves `/metrics` (Prometheus text) and `/healthz`
    /// over HTTP. A node with the serve role serves them on its forecast
    /// API too.
    #[serde(default)]
    pub metrics_listen: Option<String>,
}

/// A token or cookie: at least 16 printable ASCII characters, no spaces.
pub fn check_secret(s: &str) -> std::result::Result<(), String> {
    if s.len() < 16 {
        return Err(format!("{} characters; at least 16", s.len()));
    }
    if !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("only printable ASCII without spaces".into());
    }
    Ok(())
}

/// True for `127.x.x.x:port` and `[::1]:port`.
/// `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn valid_device(d: &str) -> bool {
    matches!(d, "auto" | "cpu" | "cuda")
        || d.strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok())
}

fn default_host() -> String {
    "127.0.0.1".into()
}

impl NodeConfig {
    /// `host:port` of the node's ractor_cluster server, if it has one.
    pub fn cluster_addr(&self) -> Option<String> {
        self.cluster_port.map(|p| format!("{}:{p}", self.host))
    }
}

/// The whole of `cluster.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub cluster: ClusterSection,
    pub kafka: KafkaConfig,
    pub s3: S3Config,
    pub postgres: PostgresConfig,
    pub embedded: EmbeddedConfig,
    pub coordinator: CoordinatorConfig,
    pub admin: AdminConfig,
    pub ingest: IngestConfig,
    pub serve: ServeConfig,
    pub features: FeatureConfig,
    pub joins: JoinConfig,
    pub aggregate: AggregateConfig,
    pub train: TrainConfig,
    pub promotion: PromotionConfig,
    pub retrain: RetrainConfig,
    pub supervision: SupervisionConfig,
    pub nodes: Vec<NodeConfig>,
}

/// `[retrain]`: when the coordinator retrains a champion on its own. A
/// (ticker, interval) with a champion and no open job gets a job (its
/// champion's model kind) once `every_bars` rows were stored after the data
/// its newest version (champion or rejected) was trained on, or once that
/// version is `schedule_secs` old. The new version then faces the
/// promotion gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrainConfig {
    /// New stored rows that call for a retrain (0: never on rows).
    pub every_bars: u64,
    /// Age of the newest version that calls for a retrain (0: never on age).
    pub schedule_secs: u64,
    /// How often the coordinator looks (and serve nodes record each served
    /// version's live error).
    pub poll_secs: u64,
    /// Drift: retrain when a champion's one-step RMSE on the last
    /// `drift_bars` stored bars after its training data exceeds `(1 +
    /// drift)` times its test RMSE (0: never on drift). Once per champion:
    /// after a retrain, new rows and the schedule decide.
    pub drift: f64,
    /// The bars the live error is measured on.
    pub drift_bars: usize,
}

impl Default for RetrainConfig {
    fn default() -> Self {
        RetrainConfig {
            every_bars: 0,
            schedule_secs: 0,
            poll_secs: 10,
            drift: 0.0,
            drift_bars: 30,
        }
    }
}

/// The error a promotion compares (`[promotion] metric`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum GateMetric {
    #[default]
    Rmse,
    Mae,
    Mse,
    Mape,
}

impl GateMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            GateMetric::Rmse => "rmse",
            GateMetric::Mae => "mae",
            GateMetric::Mse => "mse",
            GateMetric::Mape => "mape",
        }
    }
}

/// `[promotion]`: which trained versions become champion. A version is
/// promoted only when, on its test split (the latest held-out window), its
/// error is below `(1 - margin)` times the naive forecast's and the current
/// champion's on the same window; otherwise it is kept as `rejected` with
/// its metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromotionConfig {
    /// Off: every accepted checkpoint becomes the champion (no comparison).
    pub gate: bool,
    pub metric: GateMetric,
    /// The fraction by which the challenger must beat both, in `[0, 1)`.
    pub margin: f64,
}

impl Default for PromotionConfig {
    fn default() -> Self {
        PromotionConfig {
            gate: true,
            metric: GateMetric::Rmse,
            margin: 0.0,
        }
    }
}

/// `[features]`: the indicator periods of `aggregated_data`. Column names
/// carry the periods (`sma_20`, `ema_12`, `rsi_14`, `atr_14`,
/// `volatility_20`); the definitions are in `tickmesh-features`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureConfig {
    /// SMA period.
    pub sma: usize,
    /// EMA periods, one column each.
    pub ema: Vec<usize>,
    /// RSI period (Wilder).
    pub rsi: usize,
    /// MACD `[fast, slow, signal]`.
    pub macd: [usize; 3],
    /// Stochastic `[%K, %D]` periods.
    pub stoch: [usize; 2],
    /// Bollinger band period (the middle band is its SMA).
    pub bollinger: usize,
    /// Bollinger band width in standard deviations.
    pub bollinger_k: f64,
    /// ATR period (Wilder).
    pub atr: usize,
    /// Rolling volatility period (standard deviation of log returns).
    pub volatility: usize,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            sma: 20,
            ema: vec![12, 26],
            rsi: 14,
            macd: [12, 26, 9],
            stoch: [14, 3],
            bollinger: 20,
            bollinger_k: 2.0,
            atr: 14,
            volatility: 20,
        }
    }
}

/// The largest indicator period (TA-Lib's limit).
pub const MAX_PERIOD: usize = 100_000;

impl FeatureConfig {
    /// The columns of `aggregated_data` these periods produce, in order:
    /// OHLCV, then the indicators.
    pub fn columns(&self) -> Vec<String> {
        let mut c: Vec<String> = ["open", "high", "low", "close", "volume", "log_return"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        c.push(format!("sma_{}", self.sma));
        c.extend(self.ema.iter().map(|n| format!("ema_{n}")));
        c.push(format!("rsi_{}", self.rsi));
        for s in [
            "macd",
            "macd_signal",
            "macd_hist",
            "obv",
            "stoch_k",
            "stoch_d",
            "bb_upper",
            "bb_middle",
            "bb_lower",
        ] {
            c.push(s.to_string());
        }
        c.push(format!("atr_{}", self.atr));
        c.push(format!("volatility_{}", self.volatility));
        c
    }

    /// Checks the periods; the error is `(key, message)` with the key under `features.`.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((format!("features.{k}"), m));
        let range = |k: &str, n: usize, min: usize| {
            if (min..=MAX_PERIOD).contains(&n) {
                Ok(())
            } else {
                bad(k, format!("{n} is not a period in {min} ..= {MAX_PERIOD}"))
            }
        };
        range("sma", self.sma, 2)?;
        if self.ema.is_empty() {
            return bad("ema", "must list at least one period".into());
        }
        let mut seen = BTreeSet::new();
        for &n in &self.ema {
            range("ema", n, 2)?;
            if !seen.insert(n) {
                return bad("ema", format!("{n} is listed twice"));
            }
        }
        range("rsi", self.rsi, 2)?;
        let [fast, slow, signal] = self.macd;
        range("macd", fast, 2)?;
        range("macd", slow, 2)?;
        range("macd", signal, 1)?;
        if fast >= slow {
            return bad(
                "macd",
                format!("the fast period ({fast}) must be shorter than the slow one ({slow})"),
            );
        }
        range("stoch", self.stoch[0], 1)?;
        range("stoch", self.stoch[1], 1)?;
        range("bollinger", self.bollinger, 2)?;
        if !(self.bollinger_k.is_finite() && self.bollinger_k > 0.0) {
            return bad(
                "bollinger_k",
                format!("{} is not a positive width", self.bollinger_k),
            );
        }
        range("atr", self.atr, 1)?;
        range("volatility", self.volatility, 2)?;
        Ok(())
    }
}

/// `[joins]`: what the aggregator joins onto every bar, as of the bar's
/// New York date and without look-ahead (docs/aggregation.md, "Joins").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JoinConfig {
    /// Macro series (as stored in `macro-data/{SERIES}/`) → release lag in
    /// days: an observation dated D (FRED's date, the first day of the
    /// period it measures) counts as published on D + lag, and a bar sees
    /// the latest observation published on or before its date. Each series
    /// gives its own lag (the length of its period plus the agency's
    /// publication delay); there is no default, because a lag of zero would
    /// leak the future. Column `macro_{series in lower case}`.
    #[serde(rename = "macro")]
    pub macro_lags: BTreeMap<String, u32>,
    /// The fundamentals metrics joined (of [`FUNDAMENTAL_COLUMNS`]), from
    /// the latest fiscal year that ended before the bar's date and whose
    /// 10-K was filed on or before it. Column `fund_{metric}`.
    pub fundamentals: Vec<String>,
    /// For a fundamentals row without a filing date: the days after its
    /// fiscal-year end (or 31 December of `calendarYear` when that is
    /// unknown too) at which it counts as published.
    pub fundamentals_lag_days: u32,
}

/// The fundamentals metrics a join can name, in `FUNDAMENTAL_METRICS` order.
pub const FUNDAMENTAL_COLUMNS: [&str; 8] = [
    "revenue",
    "net_income",
    "eps",
    "total_assets",
    "total_liabilities",
    "total_equity",
    "operating_cash_flow",
    "shares_outstanding",
];

impl Default for JoinConfig {
    fn default() -> Self {
        JoinConfig {
            macro_lags: BTreeMap::new(),
            fundamentals: FUNDAMENTAL_COLUMNS.iter().map(|s| s.to_string()).collect(),
            fundamentals_lag_days: 90,
        }
    }
}

impl JoinConfig {
    /// The column of a macro series.
    pub fn macro_column(series: &str) -> String {
        format!("macro_{}", series.to_ascii_lowercase())
    }

    /// The columns the joins add to `aggregated_data`, in order: the macro
    /// series (sorted), then the fundamentals metrics as listed.
    pub fn columns(&self) -> Vec<String> {
        self.macro_lags
            .keys()
            .map(|s| Self::macro_column(s))
            .chain(self.fundamentals.iter().map(|m| format!("fund_{m}")))
            .collect()
    }

    /// The index in [`FUNDAMENTAL_COLUMNS`] of each joined metric.
    pub fn fundamentals_indices(&self) -> Vec<usize> {
        self.fundamentals
            .iter()
            .map(|m| {
                FUNDAMENTAL_COLUMNS
                    .iter()
                    .position(|c| c == m)
                    .expect("checked by JoinConfig::check")
            })
            .collect()
    }

    /// Checks the series names, lags and metrics; the error is `(key, message)`.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((format!("joins.{k}"), m));
        for (series, &lag) in &self.macro_lags {
            if let Err(e) = crate::types::validate_series(series) {
                return bad("macro", e.to_string());
            }
            if lag > 3660 {
                return bad(
                    &format!("macro.{series}"),
                    format!("a release lag of {lag} days is over ten years"),
                );
            }
        }
        let mut seen = BTreeSet::new();
        for m in &self.fundamentals {
            if !FUNDAMENTAL_COLUMNS.contains(&m.as_str()) {
                return bad(
                    "fundamentals",
                    format!(
                        "`{m}` is not a fundamentals metric (one of {})",
                        FUNDAMENTAL_COLUMNS.join(", ")
                    ),
                );
            }
            if !seen.insert(m) {
                return bad("fundamentals", format!("`{m}` is listed twice"));
            }
        }
        if self.fundamentals_lag_days > 3660 {
            return bad(
                "fundamentals_lag_days",
                format!("{} days is over ten years", self.fundamentals_lag_days),
            );
        }
        Ok(())
    }
}

impl ClusterConfig {
    /// Reads, parses, overrides from `env` and validates a config file.
    pub fn load(path: &Path, env: &HashMap<String, String>) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, &path.display().to_string(), env)
    }

    /// Parses config text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &str, env: &HashMap<String, String>) -> Result<Self> {
        let err = |key: String, message: String| Error::Config {
            file: file.to_string(),
            key,
            message,
        };
        let de = toml::Deserializer::new(text);
        let mut cfg: ClusterConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().to_string();
            // At the top level the path is `.`: name the unknown key itself.
            let key = match message
                .strip_prefix("unknown field `")
                .and_then(|m| m.split('`').next())
            {
                Some(field) if path == "." => field.to_string(),
                _ => path,
            };
            err(key, message)
        })?;
        cfg.apply_env(env).map_err(|(k, m)| err(k, m))?;
        cfg.validate().map_err(|(k, m)| err(k, m))?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), (String, String)> {
        let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
        if let Some(v) = get("POSTGRES_HOST") {
            self.postgres.host = v;
        }
        if let Some(v) = get("POSTGRES_PORT") {
            self.postgres.port = v.parse().map_err(|_| {
                (
                    "postgres.port".to_string(),
                    format!("environment POSTGRES_PORT=`{v}` is not a port number"),
                )
            })?;
        }
        if let Some(v) = get("POSTGRES_DB") {
            self.postgres.db = v;
        }
        if let Some(v) = get("POSTGRES_USER") {
            self.postgres.user = v;
        }
        if let Some(v) = get("POSTGRES_PASSWORD") {
            self.postgres.password = v;
        }
        if let Some(v) = get("S3_ENDPOINT_URL") {
            self.s3.endpoint_url = v;
        }
        if let Some(v) = get("S3_ACCESS_KEY") {
            self.s3.access_key = v;
        }
        if let Some(v) = get("S3_SECRET_KEY") {
            self.s3.secret_key = v;
        }
        if let Some(v) = get("KAFKA_BOOTSTRAP_SERVERS") {
            self.kafka.brokers = v;
        }
        if let Some(v) = get("TICKMESH_COOKIE") {
            self.cluster.cookie = Some(v);
        }
        if let Some(v) = get("TICKMESH_ADMIN_TOKEN") {
            self.admin.token_env = Some(v.trim().to_string());
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((k.to_string(), m));
        if self.cluster.name.trim().is_empty() {
            return bad("cluster.name", "must not be empty".into());
        }
        for (key, addr) in [
            ("coordinator.listen", &self.coordinator.listen),
            ("serve.http_listen", &self.serve.http_listen),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                return bad(
                    key,
                    format!("`{addr}` is not a socket address like 127.0.0.1:8080"),
                );
            }
        }
        if self.coordinator.heartbeat_secs == 0 {
            return bad("coordinator.heartbeat_secs", "must be at least 1".into());
        }
        if self.coordinator.lease_secs <= self.coordinator.heartbeat_secs {
            return bad(
                "coordinator.lease_secs",
                "must be longer than coordinator.heartbeat_secs".into(),
            );
        }
        if self.coordinator.max_attempts == 0 {
            return bad("coordinator.max_attempts", "must be at least 1".into());
        }
        if self.coordinator.max_open_jobs == 0 {
            return bad("coordinator.max_open_jobs", "must be at least 1".into());
        }
        if self.retrain.poll_secs == 0 {
            return bad("retrain.poll_secs", "must be at least 1".into());
        }
        if !(self.retrain.drift.is_finite() && self.retrain.drift >= 0.0) {
            return bad(
                "retrain.drift",
                format!("{} is not a fraction of at least 0", self.retrain.drift),
            );
        }
        if !(2..=100_000).contains(&self.retrain.drift_bars) {
            return bad("retrain.drift_bars", "must be 2 ..= 100000".into());
        }
        if !(0.0..1.0).contains(&self.promotion.margin) {
            return bad(
                "promotion.margin",
                format!("{} is not in [0, 1)", self.promotion.margin),
            );
        }
        for (key, v) in [
            ("serve.max_steps", self.serve.max_steps as u64),
            ("serve.max_queue", self.serve.max_queue as u64),
            ("serve.max_per_model", self.serve.max_per_model as u64),
            ("serve.request_timeout_ms", self.serve.request_timeout_ms),
            ("serve.load_retry_ms", self.serve.load_retry_ms),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.serve.load_retry_max_ms < self.serve.load_retry_ms {
            return bad(
                "serve.load_retry_max_ms",
                "must be at least serve.load_retry_ms".into(),
            );
        }
        let limit = crate::types::MAX_MESSAGE_BYTES;
        if self.ingest.max_message_bytes == 0 || self.ingest.max_message_bytes > limit {
            return bad(
                "ingest.max_message_bytes",
                format!("must be 1 ..= {limit} (the broker's fetch limit leaves no room for more)"),
            );
        }
        if self.ingest.batch_records == 0 {
            return bad("ingest.batch_records", "must be at least 1".into());
        }
        if self.ingest.write_concurrency == 0 || self.ingest.write_concurrency > 256 {
            return bad("ingest.write_concurrency", "must be 1 ..= 256".into());
        }
        if !(2..=600).contains(&self.ingest.lease_secs) {
            return bad("ingest.lease_secs", "must be 2 ..= 600".into());
        }
        // Train and serve nodes talk to the coordinator over the mesh: when
        // the coordinator runs in another process, both ends need a port.
        let coordinators: Vec<&NodeConfig> = self
            .nodes
            .iter()
            .filter(|n| n.roles.contains(&Role::Coordinator))
            .collect();
        if coordinators.len() > 1 {
            return bad(
                "nodes",
                format!(
                    "nodes `{}` and `{}` both have the coordinator role; a cluster has one coordinator",
                    coordinators[0].name, coordinators[1].name
                ),
            );
        }
        let coordinator = coordinators.first().copied();
        for n in &self.nodes {
            if let Some(addr) = &n.metrics_listen {
                if addr.parse::<SocketAddr>().is_err() {
                    return bad(
                        &format!("nodes.{}.metrics_listen", n.name),
                        format!("`{addr}` is not a socket address like 127.0.0.1:9464"),
                    );
                }
            }
        }
        for n in &self.nodes {
            let remote = (n.roles.contains(&Role::Train) || n.roles.contains(&Role::Serve))
                && !n.roles.contains(&Role::Coordinator);
            if !remote {
                continue;
            }
            if n.cluster_port.is_none() {
                return bad(
                    &format!("nodes.{}.cluster_port", n.name),
                    "required: a train or serve node talks to the coordinator over the ractor_cluster mesh".into(),
                );
            }
            let Some(c) = coordinator else {
                return bad(
                    "nodes",
                    format!(
                        "node `{}` has the {} role but no node has the coordinator role",
                        n.name,
                        if n.roles.contains(&Role::Train) {
                            "train"
                        } else {
                            "serve"
                        }
                    ),
                );
            };
            if c.cluster_port.is_none() {
                return bad(
                    &format!("nodes.{}.cluster_port", c.name),
                    format!(
                        "required: the coordinator's node is the mesh seed of node `{}` ({})",
                        n.name,
                        n.roles
                            .iter()
                            .map(|r| r.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
        match &self.cluster.cookie {
            Some(c) => {
                if let Err(why) = check_secret(c) {
                    return bad("cluster.cookie", why);
                }
            }
            None => {
                let why = if self.cluster.backend == Backend::Distributed {
                    Some("distributed mode".to_string())
                } else {
                    self.nodes
                        .iter()
                        .find(|n| n.cluster_port.is_some())
                        .map(|n| format!("node `{}` has a cluster_port", n.name))
                };
                if let Some(why) = why {
                    return bad(
                        "cluster.cookie",
                        format!(
                            "required ({why}) and there is no default: set it, or TICKMESH_COOKIE"
                        ),
                    );
                }
            }
        }
        let c = &self.cluster;
        if c.tls_cert_file.is_some() != c.tls_key_file.is_some()
            || (c.tls_cert_file.is_some() && c.tls_ca_file.is_none())
        {
            return bad(
                "cluster.tls_cert_file",
                "the mesh's TLS needs tls_cert_file, tls_key_file and tls_ca_file together".into(),
            );
        }
        if self.coordinator.tls_cert_file.is_some() != self.coordinator.tls_key_file.is_some() {
            return bad(
                "coordinator.tls_cert_file",
                "tls_cert_file and tls_key_file go together".into(),
            );
        }
        if self.coordinator.tls_cert_file.is_some() && self.coordinator.tls_ca_file.is_none() {
            return bad(
                "coordinator.tls_ca_file",
                "required with TLS: the CA that nodes and `tickmesh admin` verify the coordinator with".into(),
            );
        }
        if self.admin.deadline_secs == Some(0) {
            return bad("admin.deadline_secs", "must be at least 1".into());
        }
        if self.cluster.backend == Backend::Distributed {
            if self.kafka.brokers.trim().is_empty() {
                return bad("kafka.brokers", "must list at least one host:port".into());
            }
            if !(self.s3.endpoint_url.starts_with("http://")
                || self.s3.endpoint_url.starts_with("https://"))
            {
                return bad(
                    "s3.endpoint_url",
                    format!(
                        "`{}` must start with http:// or https://",
                        self.s3.endpoint_url
                    ),
                );
            }
            if self.s3.access_key.is_empty() || self.s3.secret_key.is_empty() {
                return bad("s3.access_key", "access and secret key must be set".into());
            }
            if self.postgres.port == 0 {
                return bad("postgres.port", "must not be 0".into());
            }
        }
        self.features.check()?;
        self.joins.check()?;
        self.aggregate.check()?;
        if self.aggregate.live && self.cluster.backend == Backend::Embedded {
            return bad(
                "aggregate.live",
                "needs the distributed backend: live mode reads live_bars in a consumer group of its own beside the ingest role's, and the embedded spool hands each record to one reader".into(),
            );
        }
        self.train.check(&self.features.columns())?;
        if self.supervision.window_secs == 0 {
            return bad("supervision.window_secs", "must be at least 1".into());
        }
        let mut names = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.name.trim().is_empty() {
                return bad(&format!("nodes[{i}].name"), "must not be empty".into());
            }
            if !names.insert(n.name.as_str()) {
                return bad(
                    &format!("nodes[{i}].name"),
                    format!("`{}` is used twice", n.name),
                );
            }
            if n.roles.is_empty() {
                return bad(
                    &format!("nodes[{i}].roles"),
                    "must list at least one role".into(),
                );
            }
            if let Some(d) = &n.device {
                if !valid_device(d) {
                    return bad(
                        &format!("nodes[{i}].device"),
                        format!("`{d}` is not one of auto, cpu, cuda, cuda:N"),
                    );
                }
            }
            if n.jobs == Some(0) {
                return bad(&format!("nodes[{i}].jobs"), "must be at least 1".into());
            }
        }
        Ok(())
    }

    /// The admin bearer token: `TICKMESH_ADMIN_TOKEN`, else `[admin] token_file`;
    /// `None` when neither is set.
    pub fn admin_token(&self) -> Result<Option<String>> {
        let (t, from) = if let Some(t) = &self.admin.token_env {
            (t.clone(), "TICKMESH_ADMIN_TOKEN".to_string())
        } else if let Some(path) = &self.admin.token_file {
            let t = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            (t.trim().to_string(), path.display().to_string())
        } else {
            return Ok(None);
        };
        check_secret(&t).map_err(|m| Error::invalid("admin token", format!("{from}: {m}")))?;
        Ok(Some(t))
    }

    /// Where an embedded coordinator keeps the admin token it made.
    pub fn embedded_token_path(&self) -> PathBuf {
        self.embedded.data_dir.join("admin.token")
    }

    /// The ractor_cluster address of the first coordinator node, the mesh's seed.
    pub fn cluster_seed(&self) -> Option<(String, String)> {
        self.nodes
            .iter()
            .find(|n| n.roles.contains(&Role::Coordinator) && n.cluster_port.is_some())
            .and_then(|n| Some((n.name.clone(), n.cluster_addr()?)))
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            let known: Vec<_> = self.nodes.iter().map(|n| n.name.as_str()).collect();
            Error::NotFound(format!(
                "node `{name}` in cluster.toml (nodes: {})",
                known.join(", ")
            ))
        })
    }

    /// The name of a topic, with the configured prefix.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.kafka.topic_prefix, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClusterConfig> {
        ClusterConfig::parse(text, "cluster.toml", &HashMap::new())
    }

    #[test]
    fn the_shipped_cluster_toml_is_valid() {
        let text = include_str!("../../../cluster.toml");
        // No cookie in the file: distributed mode wants one from the environment.
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("cluster.cookie"), "{err}");
        let env = HashMap::from([(
            "TICKMESH_COOKIE".to_string(),
            "a-shared-secret-of-the-test".to_string(),
        )]);
        let cfg = ClusterConfig::parse(text, "cluster.toml", &env).unwrap();
        assert!(!cfg.nodes.is_empty());
        assert_eq!(
            cfg.cluster.cookie.as_deref(),
            Some("a-shared-secret-of-the-test")
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("[postgres]\nport = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("`postgres.port`"), "{e}");
        assert!(e.contains("cluster.toml"), "{e}");
        let e = parse("[postgres]\nhots = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("`postgres.hots`"), "{e}");
        let e = parse("[coordinator]\nlisten = \"nowhere\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`coordinator.listen`"), "{e}");
        let e = parse("[train]\nfeatures = [\"close\", \"moon_phase\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`train.features`") && e.contains("moon_phase"),
            "{e}"
        );
        // Indicator periods name the columns a model may use.
        let e = parse("[features]\nmacd = [26, 12, 9]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`features.macd`") && e.contains("shorter"),
            "{e}"
        );
        let e = parse("[features]\nema = [12, 12]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`features.ema`") && e.contains("twice"), "{e}");
        let e = parse("[features]\nrsi = 1\n").unwrap_err().to_string();
        assert!(e.contains("`features.rsi`"), "{e}");
        // Joins: series names as stored, a lag per series, known metrics.
        let e = parse("[joins]\nmacro = { cpi = 30 }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`joins.macro`") && e.contains("`cpi`"), "{e}");
        let e = parse("[joins]\nmacro = { CPI = \"30\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("joins.macro"), "{e}");
        let e = parse("[joins]\nfundamentals = [\"eps\", \"ebitda\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`joins.fundamentals`") && e.contains("`ebitda`"),
            "{e}"
        );
        let c = parse("[joins]\nmacro = { UNEMP = 100, CPI = 110 }\nfundamentals = [\"eps\"]\n")
            .unwrap();
        assert_eq!(c.joins.columns(), ["macro_cpi", "macro_unemp", "fund_eps"]);
        assert_eq!(c.joins.macro_lags["CPI"], 110);
        let e = parse("[cluster]\nbackend = \"embedded\"\n[aggregate]\nlive = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`aggregate.live`") && e.contains("distributed"),
            "{e}"
        );
        let e = parse("[features]\nbollinger_k = -1.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`features.bollinger_k`"), "{e}");
        let e = parse("[train]\nfeatures = [\"close\", \"sma_50\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`sma_50`") && e.contains("sma_20"), "{e}");
        let ok =
            parse("[features]\nsma = 50\n[train]\nfeatures = [\"close\", \"sma_50\"]\n").unwrap();
        assert!(ok.features.columns().contains(&"sma_50".to_string()));
        let e = parse("[[nodes]]\nname = \"a\"\nroles = [\"juggler\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("nodes[0].roles"), "{e}");
        let e = parse("bogus = 1\n").unwrap_err().to_string();
        assert!(e.contains("`bogus`"), "{e}");
        for (key, value) in [
            ("lease_secs", "1"),
            ("lease_secs", "601"),
            ("write_concurrency", "0"),
            ("batch_records", "0"),
        ] {
            let e = parse(&format!("[ingest]\n{key} = {value}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`ingest.{key}`")), "{e}");
        }
        assert_eq!(
            parse("[ingest]\nlease_secs = 3\n")
                .unwrap()
                .ingest
                .lease_secs,
            3
        );
        let e = parse("[[nodes]]\nname = \"i\"\nroles = [\"ingest\"]\nmetrics_listen = \"9464\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nodes.i.metrics_listen`"), "{e}");
    }

    #[test]
    fn train_and_serve_nodes_of_a_multi_process_cluster_need_a_mesh_port() {
        let base = "[cluster]\ncookie = \"a-cookie-of-sixteen-chars\"\n\n";
        let e = parse(&format!(
            "{base}[[nodes]]\nname = \"c\"\nroles = [\"coordinator\"]\ncluster_port = 24000\n\n[[nodes]]\nname = \"t\"\nroles = [\"train\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`nodes.t.cluster_port`") && e.contains("mesh"),
            "{e}"
        );
        let e = parse(&format!(
            "{base}[[nodes]]\nname = \"c\"\nroles = [\"coordinator\"]\n\n[[nodes]]\nname = \"p\"\nroles = [\"serve\"]\ncluster_port = 24001\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`nodes.c.cluster_port`") && e.contains("seed"),
            "{e}"
        );
        let e = parse(&format!(
            "{base}[[nodes]]\nname = \"t\"\nroles = [\"train\"]\ncluster_port = 24001\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("no node has the coordinator role"), "{e}");
        let e = parse(&format!(
            "{base}[[nodes]]\nname = \"a\"\nroles = [\"coordinator\"]\n\n[[nodes]]\nname = \"b\"\nroles = [\"coordinator\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("one coordinator"), "{e}");
        // One process with every role needs no mesh.
        parse("[[nodes]]\nname = \"all\"\nroles = [\"coordinator\", \"train\", \"serve\"]\n")
            .unwrap();
    }

    #[test]
    fn environment_overrides() {
        let env: HashMap<String, String> = [
            ("POSTGRES_HOST", "db.internal"),
            ("POSTGRES_PORT", "6543"),
            ("S3_ENDPOINT_URL", "http://minio:9000"),
            ("S3_ACCESS_KEY", "ak"),
            ("S3_SECRET_KEY", "sk"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let cfg = ClusterConfig::parse("", "x.toml", &env).unwrap();
        assert_eq!(cfg.postgres.host, "db.internal");
        assert_eq!(cfg.postgres.port, 6543);
        assert_eq!(cfg.s3.endpoint_url, "http://minio:9000");
        assert_eq!(
            (cfg.s3.access_key.as_str(), cfg.s3.secret_key.as_str()),
            ("ak", "sk")
        );
        let bad: HashMap<String, String> = [("POSTGRES_PORT".to_string(), "x".to_string())].into();
        let e = ClusterConfig::parse("", "x.toml", &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("POSTGRES_PORT"), "{e}");
    }
}
