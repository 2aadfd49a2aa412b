//! One test per hop of the pipeline, on the real services that
//! `scripts/services.sh up` starts (tansu, s3s-fs, PostgreSQL).

mod common;

use std::time::Duration;

use chrono::NaiveDate;
use common::*;
use tickmesh_aggregate::aggregator;
use tickmesh_core::config::Role;
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::{bars_object_key, topics, Interval, IsoWeek, StartModel};
use tickmesh_ingest::producer;
use tickmesh_io::bus::BusConfig;
use tickmesh_io::parquet_io::decode_bars;
use tickmesh_io::store::buckets;

fn d(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

/// Kafka `h_alpaca` → BarsConsumer → one Parquet object per ticker-week in S3;
/// a malformed message goes to `h_alpaca.dlq` and the consumer goes on; the
/// offset is committed after the write (a new member of the group gets nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_to_parquet_in_s3() {
    let (cfg, a) = distributed("hop1").await;
    let node = start(&cfg, &a, &[Role::Ingest]).await;
    a.publisher
        .publish(topics::BARS, "AAPL", br#"{"ticker":"AAPL","bars":[{"t":"2024-01-08T14:30:00Z","o":-1,"h":1,"l":1,"c":1,"v":1}]}"#, &[])
        .await
        .unwrap();
    let n = producer::publish_synthetic(
        a.publisher.as_ref(),
        &["TSTA".into()],
        d("2024-01-08"),
        d("2024-01-19"),
    )
    .await
    .unwrap();
    assert_eq!(n, 2);
    let m = node.ingest_metrics.clone();
    eventually(
        "two messages written and one dead-lettered",
        Duration::from_secs(60),
        || {
            let m = m.clone();
            async move { m.messages() == 2 && m.dead_lettered() == 1 }
        },
    )
    .await;

    let bars = SyntheticMarket.bars("TSTA", d("2024-01-08"), d("2024-01-19"));
    let key = bars_object_key("TSTA", IsoWeek::of(bars[0].t));
    assert_eq!(key, "TSTA/2024/01/TSTA_2024-W02.parquet");
    let obj = a
        .store
        .get(buckets::STOCK_DATA, &key)
        .await
        .unwrap()
        .expect("object written");
    assert_eq!(decode_bars(obj, &key).unwrap(), bars[..5 * 390].to_vec());
    assert_eq!(
        a.store
            .list(buckets::STOCK_DATA, "TSTA/")
            .await
            .unwrap()
            .len(),
        2
    );

    let mut dlq = a
        .bus
        .subscribe(&topics::dlq(topics::BARS), "dlq-reader")
        .await
        .unwrap();
    let rec = dlq
        .poll(Duration::from_secs(20))
        .await
        .unwrap()
        .expect("dead-lettered record");
    assert_eq!(rec.headers["tickmesh.topic"], "h_alpaca");
    assert_eq!(rec.headers["tickmesh.offset"], "0");
    assert!(
        rec.headers["tickmesh.error"].contains("bars[0].o"),
        "{:?}",
        rec.headers
    );
    node.stop().await;

    // Committed: another consumer of the ingest group starts after the last message.
    let BusConfig::Kafka { .. } = &a.bus else {
        panic!("distributed bus")
    };
    let mut again = a.bus.subscribe(topics::BARS, "ingest").await.unwrap();
    assert!(
        again.poll(Duration::from_secs(8)).await.unwrap().is_none(),
        "offsets were not committed"
    );
}

/// Parquet in S3 → Aggregator → `aggregated_data` in PostgreSQL (idempotent)
/// → `start_model` on Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_to_aggregated_data_in_postgres() {
    let (_cfg, a) = distributed("hop2").await;
    let bars = store_synthetic(&a, "TSTB", "2024-02-05", "2024-02-16").await;
    let args = aggregator_args(&a);
    let report = aggregator::run(&args, &["TSTB".into()], Interval::M5)
        .await
        .unwrap();
    assert_eq!(report.rows["TSTB"], 10 * 78);
    let cols: Vec<String> = ["close", "sma_20", "rsi_14"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let rows =
        a.db.read_aggregated("TSTB", Interval::M5, &cols, None)
            .await
            .unwrap();
    assert_eq!(rows.len(), 780);
    assert!(rows[18].values[1].is_none() && rows[19].values[1].is_some());
    assert!(rows[13].values[2].is_none() && rows[14].values[2].is_some());
    // The 5-minute close is the close of the bucket's last 1-minute bar.
    assert_eq!(rows[0].values[0], Some(bars[4].c));

    // Replaying the load changes nothing.
    aggregator::run(&args, &["TSTB".into()], Interval::M5)
        .await
        .unwrap();
    assert_eq!(
        a.db.read_aggregated("TSTB", Interval::M5, &cols, None)
            .await
            .unwrap(),
        rows
    );
    // Daily too.
    let daily = aggregator::run(&args, &["TSTB".into()], Interval::D1)
        .await
        .unwrap();
    assert_eq!(daily.rows["TSTB"], 10);

    let mut sub = a
        .bus
        .subscribe(topics::START_MODEL, "hop2-reader")
        .await
        .unwrap();
    let rec = sub
        .poll(Duration::from_secs(20))
        .await
        .unwrap()
        .expect("start_model published");
    let sm = StartModel::parse(&rec.payload).unwrap();
    assert_eq!(sm.tickers, vec!["TSTB".to_string()]);
    assert_eq!(sm.interval, Interval::M5);

    // An unknown ticker is an error naming it, and loads nothing.
    let e = aggregator::run(&args, &["NOPE".into()], Interval::D1)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown ticker NOPE"), "{e}");
}

/// `start_model` → coordinator (gRPC) → trainer → checkpoint in S3 and a
/// champion in `model_versions` → pushed to the predictor → HTTP forecast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_model_to_checkpoint_to_forecast() {
    let (cfg, a) = distributed("hop3").await;
    store_synthetic(&a, "TSTC", "2024-04-01", "2024-04-12").await;
    let node = start(&cfg, &a, &[Role::Coordinator, Role::Train, Role::Serve]).await;
    let args = aggregator_args(&a);
    // This publishes start_model on Kafka; the coordinator consumes it.
    aggregator::run(&args, &["TSTC".into()], Interval::M15)
        .await
        .unwrap();

    let db = a.db.clone();
    eventually(
        "a champion in model_versions",
        Duration::from_secs(120),
        || {
            let db = db.clone();
            async move {
                db.champions()
                    .await
                    .unwrap()
                    .iter()
                    .any(|m| m.ticker == "TSTC")
            }
        },
    )
    .await;
    let champ =
        a.db.champions()
            .await
            .unwrap()
            .into_iter()
            .find(|m| m.ticker == "TSTC")
            .unwrap();
    assert_eq!((champ.version, champ.interval), (1, Interval::M15));
    assert!(champ.uri.starts_with("s3://"), "{}", champ.uri);
    let keys = a.store.list(buckets::MODELS, "TSTC/15m/v1/").await.unwrap();
    assert_eq!(
        keys,
        vec![
            "TSTC/15m/v1/meta.json",
            "TSTC/15m/v1/model.safetensors",
            "TSTC/15m/v1/test.json"
        ]
    );
    // Staged under a temporary prefix, published, and the staging copy removed.
    assert!(a
        .store
        .list(buckets::MODELS, "TSTC/15m/.staging/")
        .await
        .unwrap()
        .is_empty());
    let (meta, _) =
        tickmesh_model::checkpoint::read(a.store.as_ref(), "TSTC", Interval::M15, 1, &champ.sha256)
            .await
            .unwrap();
    assert_eq!(meta.features, cfg.train.features);
    assert!(meta.metrics.naive.rmse > 0.0 && meta.metrics.model.rmse > 0.0);
    assert_eq!(meta.device, "cpu");

    let http = node.bound.http.unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://{http}/ml/forecast?ticker=TSTC&interval=15m&n_steps=5");
    let started = std::time::Instant::now();
    let body: serde_json::Value = loop {
        let r = client.get(&url).send().await.unwrap();
        if r.status() == 200 {
            break r.json().await.unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the predictor never served TSTC: {}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["model"]["version"], 1);
    let f = body["forecasts"].as_array().unwrap();
    assert_eq!(f.len(), 5);
    assert!(f.iter().all(|p| p["close"].as_f64().unwrap() > 0.0));

    let r = client
        .get(format!(
            "http://{http}/ml/forecast?ticker=ZZZZ&interval=15m"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(
        e["error"].as_str().unwrap().contains("unknown ticker ZZZZ"),
        "{e}"
    );
    let r = client
        .get(format!(
            "http://{http}/ml/forecast?ticker=TSTC&interval=15m&n_steps=0"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = client
        .get(format!("http://{http}/ml/forecast?ticker=TSTC&interval=7m"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    node.stop().await;
}

/// The real S3 store, failing its first `n` writes (fault injection; every
/// write that succeeds goes to s3s-fs).
struct FailingFirstWrites {
    inner: tickmesh_io::store::SharedStore,
    left: std::sync::atomic::AtomicUsize,
}

impl FailingFirstWrites {
    fn fail_first(&self, bucket: &str, key: &str) -> tickmesh_core::Result<()> {
        use std::sync::atomic::Ordering;
        if self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(tickmesh_core::Error::Store {
                op: "put",
                bucket: bucket.into(),
                key: key.into(),
                message: "injected failure".into(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl tickmesh_io::store::ObjectStore for FailingFirstWrites {
    async fn put(&self, bucket: &str, key: &str, data: bytes::Bytes) -> tickmesh_core::Result<()> {
        self.fail_first(bucket, key)?;
        self.inner.put(bucket, key, data).await
    }
    async fn get(&self, bucket: &str, key: &str) -> tickmesh_core::Result<Option<bytes::Bytes>> {
        self.inner.get(bucket, key).await
    }
    async fn get_tagged(
        &self,
        bucket: &str,
        key: &str,
    ) -> tickmesh_core::Result<Option<(bytes::Bytes, String)>> {
        self.inner.get_tagged(bucket, key).await
    }
    async fn put_if(
        &self,
        bucket: &str,
        key: &str,
        data: bytes::Bytes,
        expected: Option<&str>,
    ) -> tickmesh_core::Result<bool> {
        self.fail_first(bucket, key)?;
        self.inner.put_if(bucket, key, data, expected).await
    }
    async fn list(&self, bucket: &str, prefix: &str) -> tickmesh_core::Result<Vec<String>> {
        self.inner.list(bucket, prefix).await
    }
    async fn delete(&self, bucket: &str, key: &str) -> tickmesh_core::Result<()> {
        self.inner.delete(bucket, key).await
    }
    async fn copy(&self, bucket: &str, from: &str, to: &str) -> tickmesh_core::Result<()> {
        self.inner.copy(bucket, from, to).await
    }
    fn uri(&self, bucket: &str, key: &str) -> String {
        self.inner.uri(bucket, key)
    }
}

/// Nothing accepted is lost: a write that fails crashes the consumer without
/// committing, its supervisor restarts it, and the redelivered message is
/// written once the store accepts writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_write_is_retried_after_a_restart() {
    use std::sync::Arc;
    use tickmesh_io::Adapters;

    let (mut cfg, a) = distributed("hop4").await;
    let flaky = Arc::new(FailingFirstWrites {
        inner: a.store.clone(),
        left: 3.into(),
    });
    let adapters = Adapters {
        store: flaky.clone(),
        ..a.clone()
    };
    cfg.supervision.max_restarts = 10;
    cfg.supervision.backoff_ms = 50;
    let node = start(&cfg, &adapters, &[Role::Ingest]).await;
    producer::publish_synthetic(
        a.publisher.as_ref(),
        &["TSTD".into()],
        d("2024-06-03"),
        d("2024-06-03"),
    )
    .await
    .unwrap();
    let m = node.ingest_metrics.clone();
    eventually(
        "the redelivered message to be written",
        Duration::from_secs(60),
        || {
            let m = m.clone();
            async move { m.messages() == 1 }
        },
    )
    .await;
    assert_eq!(
        flaky.left.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "three writes failed first"
    );
    let keys = a.store.list(buckets::STOCK_DATA, "TSTD/").await.unwrap();
    assert_eq!(keys, vec!["TSTD/2024/06/TSTD_2024-W23.parquet"]);
    node.stop().await;
}
