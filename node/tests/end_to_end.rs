//! The whole chain for two tickers, on the distributed services and on the
//! embedded defaults, through the same `demo::pipeline` the demo runs.

mod common;

use std::time::Duration;

use chrono::NaiveDate;
use common::*;
use tickmesh::demo::{pipeline, Inputs};
use tickmesh_core::types::Interval;

fn inputs(daily: bool) -> Inputs {
    let d = |s: &str| s.parse::<NaiveDate>().unwrap();
    Inputs {
        daily_csv: daily.then(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sample/stocks_daily.csv")
        }),
        daily_tickers: if daily { vec!["IBM".into()] } else { vec![] },
        daily_from: Some(d("2011-01-01")),
        synthetic_tickers: vec!["SYNX".into(), "SYNY".into()],
        synthetic_from: d("2024-05-06"),
        synthetic_to: d("2024-05-17"),
        synthetic_interval: Interval::M15,
        macro_csv: Some(tickmesh_ingest_sample("macrodata.csv")),
        fundamentals: Some(tickmesh_ingest_sample("fundamentals.csv")),
        malformed: true,
        n_steps: 4,
        model: Default::default(),
        timeout: Duration::from_secs(300),
    }
}

fn tickmesh_ingest_sample(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/sample")
        .join(name)
}

fn check(outcomes: &[tickmesh::demo::Outcome], expected: &[(&str, &str)]) {
    assert_eq!(outcomes.len(), expected.len());
    for (o, (t, i)) in outcomes.iter().zip(expected) {
        assert_eq!((o.ticker.as_str(), o.interval.as_str()), (*t, *i));
        // The tests' config turns the promotion gate off: every model serves.
        let r = o.response.as_ref().expect("a forecast");
        let f = r["forecasts"].as_array().unwrap();
        assert_eq!(f.len(), 4);
        let last = r["last_close"].as_f64().unwrap();
        for p in f {
            let c = p["close"].as_f64().unwrap();
            assert!(
                c > 0.5 * last && c < 1.5 * last,
                "{t}: forecast {c} vs last close {last}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_chain_on_kafka_s3_postgres() {
    let (cfg, a) = distributed("e2e").await;
    let node = start(&cfg, &a, &ALL_ROLES).await;
    let out = pipeline(&node, &a, &inputs(false)).await.unwrap();
    check(&out, &[("SYNX", "15m"), ("SYNY", "15m")]);
    assert_eq!(node.ingest_metrics.dead_lettered(), 1);
    node.stop().await;
    sources_stored(&a).await;
}

/// The macro and fundamentals samples went through their consumers: one
/// object per series-year (CPI: 1959..2009) and per symbol-year (AAPL: 2018..2025).
async fn sources_stored(a: &tickmesh_io::Adapters) {
    use tickmesh_io::store::buckets;
    let cpi = a.store.list(buckets::MACRO_DATA, "CPI/").await.unwrap();
    assert_eq!(cpi.len(), 51, "{cpi:?}");
    assert!(cpi.contains(&"CPI/1959/CPI_1959.parquet".to_string()));
    let aapl = a.store.list(buckets::COMPANY, "AAPL/").await.unwrap();
    assert_eq!(aapl.len(), 8, "{aapl:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_chain_on_embedded_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, a) = embedded(dir.path()).await;
    let node = start(&cfg, &a, &ALL_ROLES).await;
    let out = pipeline(&node, &a, &inputs(true)).await.unwrap();
    check(&out, &[("IBM", "1d"), ("SYNX", "15m"), ("SYNY", "15m")]);
    // The malformed message is kept in the dead-letter spool, not lost.
    let dlq: Vec<_> = std::fs::read_dir(dir.path().join("raw/h_alpaca.dlq"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name().to_string_lossy().ends_with(".json")
                && !e.file_name().to_string_lossy().ends_with(".headers.json")
        })
        .collect();
    assert_eq!(dlq.len(), 1);
    assert!(dir.path().join("store/models/IBM/1d/v1/meta.json").exists());
    node.stop().await;
    sources_stored(&a).await;

    // A checkpoint whose weights were altered is refused.
    use tickmesh_io::store::buckets;
    let champ =
        a.db.champions()
            .await
            .unwrap()
            .into_iter()
            .find(|m| m.ticker == "IBM")
            .unwrap();
    a.store
        .put(
            buckets::MODELS,
            "IBM/1d/v1/model.safetensors",
            vec![0u8; 64].into(),
        )
        .await
        .unwrap();
    let e =
        tickmesh_model::checkpoint::read(a.store.as_ref(), "IBM", Interval::D1, 1, &champ.sha256)
            .await
            .unwrap_err()
            .to_string();
    assert!(e.contains("does not match"), "{e}");
}
