//! Shared set-up of the integration tests: configs pointing at the real
//! services (`scripts/services.sh up`), nodes started exactly as the binary
//! starts them, and polling with a timeout instead of sleeping.
#![allow(dead_code)]

pub mod serving;

use std::future::Future;
use std::time::{Duration, Instant};

use tickmesh::roles::{self, Node};
use tickmesh_core::config::{ClusterConfig, Role};
use tickmesh_io::Adapters;

/// Small, fast training settings for tests.
pub fn fast_training(cfg: &mut ClusterConfig) {
    cfg.train.epochs = 3;
    cfg.train.hidden = 8;
    cfg.train.seq_len = 10;
    cfg.train.device = "cpu".into();
    cfg.coordinator.listen = "127.0.0.1:0".into();
    cfg.serve.http_listen = "127.0.0.1:0".into();
    // The tests run their aggregations themselves (tests/aggregate_auto.rs
    // covers the role on its own).
    cfg.aggregate.on_ingest = false;
    // Every model these small fits make serves, whether or not it beats
    // naive: the tests of the pipeline's plumbing need one served
    // (tests/promotion.rs and the coordinator's actor tests cover the gate).
    cfg.promotion.gate = false;
}

pub async fn distributed(label: &str) -> (ClusterConfig, Adapters) {
    let mut cfg = tickmesh_testkit::distributed_config(label).await;
    fast_training(&mut cfg);
    let adapters = Adapters::connect(&cfg)
        .await
        .expect("connect to the test services");
    (cfg, adapters)
}

pub async fn embedded(dir: &std::path::Path) -> (ClusterConfig, Adapters) {
    let mut cfg = tickmesh_testkit::embedded_config(dir);
    fast_training(&mut cfg);
    let adapters = Adapters::connect(&cfg)
        .await
        .expect("open the embedded adapters");
    (cfg, adapters)
}

pub async fn start(cfg: &ClusterConfig, adapters: &Adapters, roles: &[Role]) -> Node {
    roles::start(cfg, "test-node", roles, adapters)
        .await
        .expect("start roles")
}

pub const ALL_ROLES: [Role; 5] = [
    Role::Coordinator,
    Role::Ingest,
    Role::Aggregate,
    Role::Train,
    Role::Serve,
];

/// Polls `cond` every 100 ms until it holds or `timeout` passes (then panics with `what`).
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes synthetic 1-minute bars of `ticker` straight into the store (as the
/// ingest role would) and returns them.
pub async fn store_synthetic(
    a: &Adapters,
    ticker: &str,
    from: &str,
    to: &str,
) -> Vec<tickmesh_core::types::Bar> {
    let bars = tickmesh_core::synthetic::SyntheticMarket.bars(
        ticker,
        from.parse().unwrap(),
        to.parse().unwrap(),
    );
    for msg in tickmesh_ingest::producer::weekly_messages(ticker, &bars) {
        tickmesh_ingest::bars_consumer::write_bars(a.store.as_ref(), &msg)
            .await
            .unwrap();
    }
    bars
}

pub fn aggregator_args(a: &Adapters) -> tickmesh_aggregate::aggregator::AggregatorArgs {
    tickmesh_aggregate::aggregator::AggregatorArgs::of(
        &ClusterConfig::default(),
        Some(2),
        a.store.clone(),
        a.db.clone(),
        a.publisher.clone(),
    )
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with openssl.
pub fn make_certs(dir: &std::path::Path) {
    let ossl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=tickmesh test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    ossl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=coordinator",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:coordinator\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    ossl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
}

/// The repository root.
pub fn repo() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Python of the torch venv (`scripts/env.sh` puts it first on PATH,
/// `TICKMESH_PYTHON` overrides), checked to import `modules`.
pub fn python_with(modules: &str) -> String {
    let py = std::env::var("TICKMESH_PYTHON").unwrap_or_else(|_| "python".into());
    let ok = std::process::Command::new(&py)
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{py}` cannot import {modules}: run scripts/setup.sh and `. scripts/env.sh` (scripts/test.sh does both)"
    );
    py
}

/// The last 30 lines of a node's log, for assertion messages.
pub fn tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The `[cluster]` to `[postgres]` sections of a cluster.toml for node
/// processes on `cfg`'s services (its prefixes and database); a test
/// appends its `[ingest]` and `[[nodes]]`.
pub fn services_toml(cfg: &ClusterConfig, name: &str) -> String {
    format!(
        r#"[cluster]
name = "{name}"
backend = "distributed"
cookie = "{name}-cookie-for-the-test"
[kafka]
brokers = "{brokers}"
topic_prefix = "{prefix}"
group_id = "{group}"
[s3]
endpoint_url = "{s3}"
bucket_prefix = "{bucket_prefix}"
[postgres]
port = {pg}
db = "{db}"
"#,
        brokers = cfg.kafka.brokers,
        prefix = cfg.kafka.topic_prefix,
        group = cfg.kafka.group_id,
        s3 = cfg.s3.endpoint_url,
        bucket_prefix = cfg.s3.bucket_prefix,
        pg = cfg.postgres.port,
        db = cfg.postgres.db,
    )
}

/// Reads every object of the `stock-data` bucket back with pyarrow over
/// the S3 protocol (`scripts/py/readback_parquet.py`, independent of
/// tickmesh's reader) and asserts its (ticker, timestamp) rows are exactly
/// `expected`: 0 missing, 0 duplicates, 0 extra.
pub fn assert_bars_read_back(
    py: &str,
    cfg: &ClusterConfig,
    expected: &std::collections::BTreeSet<(String, i64)>,
    dir: &std::path::Path,
) {
    let exp_path = dir.join("expected.csv");
    let text: String = expected
        .iter()
        .map(|(t, us)| format!("{t},{us}\n"))
        .collect();
    std::fs::write(&exp_path, text).unwrap();
    let out = std::process::Command::new(py)
        .arg(repo().join("scripts/py/readback_parquet.py"))
        .args([
            cfg.s3.endpoint_url.as_str(),
            cfg.s3.access_key.as_str(),
            cfg.s3.secret_key.as_str(),
            &format!("{}stock-data", cfg.s3.bucket_prefix),
        ])
        .arg(&exp_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "readback_parquet.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("read back: {report}");
    assert_eq!(report["missing"], 0, "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert_eq!(report["extra"], 0, "{report}");
    assert_eq!(report["distinct"], expected.len(), "{report}");
}

/// One `ticker<TAB>message` line per ticker-day of `bars`, the input of
/// `scripts/py/kafka_produce.py` (confluent-kafka batches such small
/// messages many to a record batch).
pub fn daily_tsv_lines(ticker: &str, bars: &[tickmesh_core::types::Bar]) -> String {
    bars.chunk_by(|x, y| x.t.date_naive() == y.t.date_naive())
        .map(|day| {
            let m = tickmesh_core::types::BarsMessage {
                ticker: ticker.to_string(),
                bars: day.to_vec(),
            };
            format!("{ticker}\t{}\n", serde_json::to_string(&m).unwrap())
        })
        .collect()
}
