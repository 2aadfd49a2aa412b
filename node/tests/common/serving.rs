//! A serve node on the embedded backend with real checkpoints of small
//! models trained here, and the HTTP calls the serving tests make
//! (`tests/serve.rs`, `tests/dashboard.rs`).

use std::time::Duration;

use super::*;
use tickmesh::roles::Node;
use tickmesh_aggregate::aggregator;
use tickmesh_core::config::{ClusterConfig, Role};
use tickmesh_core::types::Interval;
use tickmesh_io::db::ModelVersion;
use tickmesh_io::Adapters;
use tickmesh_model::checkpoint::{self, Files, Meta};
use tickmesh_model::dataset::Dataset;
use tickmesh_serve::predictor::VersionRef;
use tickmesh_serve::registry::RegistryMsg;

pub const I: Interval = Interval::M15;

pub struct Serve {
    pub dir: tempfile::TempDir,
    pub cfg: ClusterConfig,
    pub a: Adapters,
    pub node: Node,
    pub http: String,
    pub client: reqwest::Client,
}

/// A serve node on the embedded backend, with 15-minute rows of `tickers`.
pub async fn serve(tickers: &[&str], tweak: impl FnOnce(&mut ClusterConfig)) -> Serve {
    serve_roles(tickers, &[Role::Serve], tweak).await
}

pub async fn serve_roles(
    tickers: &[&str],
    roles: &[Role],
    tweak: impl FnOnce(&mut ClusterConfig),
) -> Serve {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, a) = embedded(dir.path()).await;
    tweak(&mut cfg);
    for t in tickers {
        store_synthetic(&a, t, "2024-04-01", "2024-04-12").await;
    }
    let tickers: Vec<String> = tickers.iter().map(|t| t.to_string()).collect();
    aggregator::run(&aggregator_args(&a), &tickers, I)
        .await
        .unwrap();
    let node = start(&cfg, &a, roles).await;
    let http = format!("http://{}", node.bound.http.unwrap());
    Serve {
        dir,
        cfg,
        a,
        node,
        http,
        client: reqwest::Client::new(),
    }
}

impl Serve {
    /// A checkpoint of a small model trained on `ticker`'s rows (one epoch).
    pub async fn train(&self, ticker: &str, version: i64) -> (Meta, Files) {
        self.train_until(ticker, version, None).await
    }

    /// [`Serve::train`] on the rows up to `until` (the later ones are
    /// "live": stored after the model's training data).
    pub async fn train_until(
        &self,
        ticker: &str,
        version: i64,
        until: Option<chrono::DateTime<chrono::Utc>>,
    ) -> (Meta, Files) {
        let mut c = self.cfg.train.clone();
        c.epochs = 1;
        c.seed = version;
        let mut rows = self
            .a
            .db
            .read_aggregated(ticker, I, &c.features, None)
            .await
            .unwrap();
        if let Some(t) = until {
            rows.retain(|r| r.ts <= t);
        }
        let (ticker, indicators) = (ticker.to_string(), self.cfg.features.clone());
        tokio::task::spawn_blocking(move || {
            let ds = Dataset::build(
                &rows,
                &c.features,
                c.seq_len,
                c.val_fraction,
                c.test_fraction,
            )
            .unwrap();
            let fitted = tickmesh_model::fit::fit(ds, &c, tch::Device::Cpu, |_| {}).unwrap();
            let weights = checkpoint::weights_bytes(&fitted.vs).unwrap();
            let meta = Meta::of(&fitted, &c, &indicators, &ticker, I, version, &weights);
            let files = Files::new(&meta, weights, &fitted.test_points).unwrap();
            (meta, files)
        })
        .await
        .unwrap()
    }

    /// Publishes `files`, registers the version as champion with `digest`,
    /// and tells the predictor registry (as the coordinator would).
    pub async fn release(&self, ticker: &str, version: i64, files: &Files, digest: &str) {
        checkpoint::publish(self.a.store.as_ref(), ticker, I, version, files)
            .await
            .unwrap();
        self.register(ticker, version, digest).await;
    }

    pub async fn register(&self, ticker: &str, version: i64, digest: &str) {
        self.record(ticker, version, digest, "champion").await;
        self.node
            .registry
            .get()
            .unwrap()
            .cast(RegistryMsg::ModelAvailable {
                ticker: ticker.into(),
                interval: I,
                version: VersionRef {
                    version,
                    sha256: digest.into(),
                },
            })
            .unwrap();
    }

    /// A row of `model_versions`.
    pub async fn record(&self, ticker: &str, version: i64, digest: &str, status: &str) {
        self.record_metrics(ticker, version, digest, status, "{}")
            .await
    }

    /// A row of `model_versions` with its metrics JSON.
    pub async fn record_metrics(
        &self,
        ticker: &str,
        version: i64,
        digest: &str,
        status: &str,
        metrics: &str,
    ) {
        self.a
            .db
            .insert_model_version(&ModelVersion {
                ticker: ticker.into(),
                interval: I,
                version,
                kind: "lstm_attention".into(),
                uri: format!("test://{ticker}/{version}"),
                sha256: digest.into(),
                metrics: metrics.into(),
                status: status.into(),
                created_at: chrono::Utc::now(),
            })
            .await
            .unwrap();
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.http))
            .send()
            .await
            .unwrap()
    }

    pub async fn forecast(&self, ticker: &str, n: usize) -> reqwest::Response {
        self.get(&format!(
            "/ml/forecast?ticker={ticker}&interval=15m&n_steps={n}"
        ))
        .await
    }

    /// The predictor entry of `/ml/models` for `ticker`.
    pub async fn predictor(&self, ticker: &str) -> serde_json::Value {
        let all: serde_json::Value = self.get("/ml/models").await.json().await.unwrap();
        all["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["ticker"] == ticker)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    pub async fn wait_serving(&self, ticker: &str, version: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let p = self.predictor(ticker).await;
            if p["version"] == version {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{ticker} never served v{version}: {p}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of a metric whose labels include `labels` in `/metrics`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.get("/metrics").await.text().await.unwrap();
        metric_value(&text, name, labels)
    }
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}
