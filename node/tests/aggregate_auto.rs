//! The aggregate role on its own: ingest watermarks trigger a run that
//! publishes one `start_model`; a later delivery triggers a run of just
//! the tickers it moved; requests through the Admin API and a schedule run
//! too, and a failed run is recorded with its error. On the real broker,
//! S3 server and PostgreSQL (`scripts/services.sh up`), and on the
//! embedded defaults.

mod common;

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use common::*;
use tickmesh_core::config::Role;
use tickmesh_core::types::{topics, Interval, StartModel};
use tickmesh_ingest::producer;

fn d(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

fn t(s: &str) -> DateTime<Utc> {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_watermarks_trigger_runs_of_the_tickers_that_moved() {
    let (mut cfg, a) = distributed("aggauto").await;
    cfg.aggregate.on_ingest = true;
    cfg.aggregate.settle_secs = 1;
    cfg.aggregate.poll_ms = 200;
    cfg.aggregate.intervals = vec![Interval::M15];
    let mut sub = a
        .bus
        .subscribe(topics::START_MODEL, "aggauto-reader")
        .await
        .unwrap();
    let node = start(&cfg, &a, &[Role::Ingest, Role::Aggregate]).await;

    let tickers: Vec<String> = vec!["AUTA".into(), "AUTB".into()];
    producer::publish_synthetic(
        a.publisher.as_ref(),
        &tickers,
        d("2024-06-03"),
        d("2024-06-14"),
    )
    .await
    .unwrap();
    let rec = sub
        .poll(Duration::from_secs(120))
        .await
        .unwrap()
        .expect("a start_model after the ingest");
    let sm = StartModel::parse(&rec.payload).unwrap();
    assert_eq!(sm.tickers, tickers);
    assert_eq!(sm.interval, Interval::M15);
    // The last 15-minute bucket of 2024-06-14 starts at 15:45 New York.
    assert_eq!(sm.watermark, t("2024-06-14T19:45:00Z"));
    for ticker in &tickers {
        assert_eq!(
            a.db.count_aggregated(ticker, Interval::M15).await.unwrap(),
            10 * 26
        );
    }
    // The watermark is the last bar written; both tickers became active.
    let wm = a.db.active_watermarks().await.unwrap();
    assert_eq!(
        wm,
        vec![
            ("AUTA".to_string(), t("2024-06-14T19:59:00Z")),
            ("AUTB".to_string(), t("2024-06-14T19:59:00Z"))
        ]
    );
    assert_eq!(a.db.active_companies().await.unwrap(), tickers);
    let marks = a.db.aggregate_marks(Interval::M15).await.unwrap();
    assert_eq!(marks["AUTA"], t("2024-06-14T19:59:00Z"));

    // One more week of AUTA: a run of AUTA alone.
    producer::publish_synthetic(
        a.publisher.as_ref(),
        &["AUTA".into()],
        d("2024-06-17"),
        d("2024-06-21"),
    )
    .await
    .unwrap();
    let rec = sub
        .poll(Duration::from_secs(120))
        .await
        .unwrap()
        .expect("a start_model after the second delivery");
    let sm = StartModel::parse(&rec.payload).unwrap();
    // 2024-06-19 is Juneteenth: four sessions.
    assert_eq!(sm.tickers, vec!["AUTA".to_string()]);
    assert_eq!(sm.watermark, t("2024-06-21T19:45:00Z"));
    assert_eq!(
        a.db.count_aggregated("AUTA", Interval::M15).await.unwrap(),
        14 * 26
    );
    // Nothing else is published while nothing moves.
    assert!(sub.poll(Duration::from_secs(3)).await.unwrap().is_none());

    // Both runs are recorded as triggered by the ingest.
    let runs = a.db.aggregations(10).await.unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(
        runs.iter()
            .all(|r| r.trigger == "ingest" && r.state == "done"),
        "{runs:?}"
    );
    assert_eq!(runs[0].tickers, vec!["AUTA".to_string()]);

    // The Admin API's request (what Admin.Aggregate queues) runs too; one
    // for a ticker without data fails, saying why.
    let ok = a.db.request_aggregation(&[], Interval::D1).await.unwrap();
    let bad =
        a.db.request_aggregation(&["NODATA".into()], Interval::D1)
            .await
            .unwrap();
    let db = a.db.clone();
    eventually("both requests finish", Duration::from_secs(60), || {
        let (db, ok, bad) = (db.clone(), ok.clone(), bad.clone());
        async move {
            let done = |id: String| {
                let db = db.clone();
                async move {
                    let r = db.aggregate_request(&id).await.unwrap().unwrap();
                    r.state == "done" || r.state == "failed"
                }
            };
            done(ok).await && done(bad).await
        }
    })
    .await;
    let r = a.db.aggregate_request(&ok).await.unwrap().unwrap();
    assert_eq!(
        (r.trigger.as_str(), r.state.as_str()),
        ("admin", "done"),
        "{r:?}"
    );
    assert!(r.outcome.starts_with("2 tickers"), "{r:?}");
    assert_eq!(
        a.db.count_aggregated("AUTB", Interval::D1).await.unwrap(),
        10
    );
    let r = a.db.aggregate_request(&bad).await.unwrap().unwrap();
    assert_eq!(r.state, "failed");
    assert!(r.outcome.contains("unknown ticker NODATA"), "{r:?}");
    let rec = sub.poll(Duration::from_secs(20)).await.unwrap().unwrap();
    let sm = StartModel::parse(&rec.payload).unwrap();
    assert_eq!((sm.tickers.len(), sm.interval), (2, Interval::D1));
    node.stop().await;
}

/// Embedded defaults: with the ingest trigger off, the schedule aggregates
/// every active ticker with data; a failing run is recorded and retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_runs_every_active_ticker() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, a) = embedded(dir.path()).await;
    cfg.aggregate.on_ingest = false;
    cfg.aggregate.schedule_secs = 1;
    cfg.aggregate.poll_ms = 100;
    cfg.aggregate.intervals = vec![Interval::H1];
    store_synthetic(&a, "SCHA", "2024-06-03", "2024-06-07").await;
    // What the ingest role records after writing the objects.
    a.db.advance_watermarks("bars", &[("SCHA".into(), t("2024-06-07T19:59:00Z"))])
        .await
        .unwrap();
    let node = start(&cfg, &a, &[Role::Aggregate]).await;
    let db = a.db.clone();
    eventually("a scheduled run", Duration::from_secs(60), || {
        let db = db.clone();
        async move { db.count_aggregated("SCHA", Interval::H1).await.unwrap() == 5 * 7 }
    })
    .await;
    let runs = a.db.aggregations(10).await.unwrap();
    assert!(
        runs.iter()
            .any(|r| r.trigger == "schedule" && r.state == "done"),
        "{runs:?}"
    );
    node.stop().await;
}
