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
        wm.iter()
            .map(|w| (w.ticker.as_str(), w.through))
            .collect::<Vec<_>>(),
        vec![
            ("AUTA", t("2024-06-14T19:59:00Z")),
            ("AUTB", t("2024-06-14T19:59:00Z"))
        ]
    );
    assert_eq!(a.db.active_companies().await.unwrap(), tickers);
    // Each series is marked with the version it was loaded from.
    let marks = a.db.aggregate_marks(Interval::M15).await.unwrap();
    assert_eq!(marks["AUTA"], wm[0].version);

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
/// every active ticker with data. A ticker that fails (no bars in the store)
/// does not hold the others back: they load, and the run is recorded as
/// failed with the error naming that ticker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_runs_every_active_ticker() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, a) = embedded(dir.path()).await;
    cfg.aggregate.on_ingest = false;
    cfg.aggregate.schedule_secs = 1;
    cfg.aggregate.poll_ms = 100;
    cfg.aggregate.intervals = vec![Interval::H1];
    store_synthetic(&a, "SCHA", "2024-06-03", "2024-06-07").await;
    // What the ingest role records after writing the objects (SCHB's
    // objects were lost since).
    a.db.advance_watermarks(
        "bars",
        &[
            ("SCHA".into(), t("2024-06-07T19:59:00Z")),
            ("SCHB".into(), t("2024-06-07T19:59:00Z")),
        ],
    )
    .await
    .unwrap();
    let node = start(&cfg, &a, &[Role::Aggregate]).await;
    let db = a.db.clone();
    eventually("a scheduled run", Duration::from_secs(60), || {
        let db = db.clone();
        async move {
            db.aggregations(10)
                .await
                .unwrap()
                .iter()
                .any(|r| r.trigger == "schedule")
        }
    })
    .await;
    assert_eq!(
        a.db.count_aggregated("SCHA", Interval::H1).await.unwrap(),
        5 * 7
    );
    let runs = a.db.aggregations(10).await.unwrap();
    let run = runs.iter().find(|r| r.trigger == "schedule").unwrap();
    assert_eq!(run.state, "failed", "{run:?}");
    assert!(
        run.outcome.contains("1 of 2 tickers failed")
            && run.outcome.contains("unknown ticker SCHB")
            && run.outcome.contains("start_model for SCHA"),
        "{run:?}"
    );
    // SCHA is marked as loaded from its version; SCHB is not.
    let marks = a.db.aggregate_marks(Interval::H1).await.unwrap();
    assert!(
        marks.contains_key("SCHA") && !marks.contains_key("SCHB"),
        "{marks:?}"
    );
    node.stop().await;
}

/// Any write counts, not only newer bars: a backfill of an older week and
/// a new 10-K move a ticker's version, and a macro release moves every
/// ticker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_grow_with_every_write_that_can_change_rows() {
    let dir = tempfile::tempdir().unwrap();
    let (_cfg, a) = embedded(dir.path()).await;
    let late = t("2024-06-07T19:59:00Z");
    let version = |db: tickmesh_io::db::Db| async move {
        db.active_watermarks()
            .await
            .unwrap()
            .into_iter()
            .map(|w| (w.ticker, w.version, w.through))
            .collect::<Vec<_>>()
    };
    a.db.advance_watermarks("bars", &[("VERA".into(), late), ("VERB".into(), late)])
        .await
        .unwrap();
    assert_eq!(
        version(a.db.clone()).await,
        vec![("VERA".into(), 1, late), ("VERB".into(), 1, late)]
    );
    // A backfill of an older week: the version moves, `through` does not.
    a.db.advance_watermarks("bars", &[("VERA".into(), t("2024-01-05T19:59:00Z"))])
        .await
        .unwrap();
    // A new 10-K for VERB, then a macro release.
    a.db.advance_watermarks("company", &[("VERB".into(), t("2024-03-31T00:00:00Z"))])
        .await
        .unwrap();
    a.db.advance_watermarks("macro", &[("CPI".into(), t("2024-04-01T00:00:00Z"))])
        .await
        .unwrap();
    assert_eq!(
        version(a.db.clone()).await,
        vec![("VERA".into(), 3, late), ("VERB".into(), 3, late)]
    );
}

/// Admin requests are leased: only the claiming node renews or finishes
/// one; a request whose lease ran out is taken over by the next node that
/// claims, and its first node can then no longer finish it; a request
/// claimed 3 times without finishing (its nodes died) is failed with the
/// reason. On PostgreSQL and on SQLite, against the database itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_are_leased_finished_by_their_node_and_capped_at_3_claims() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pg) = distributed("agglease").await;
    let (_, lite) = embedded(dir.path()).await;
    for (backend, db) in [("postgresql", pg.db), ("sqlite", lite.db)] {
        let later = || Utc::now() + chrono::Duration::seconds(60);
        let gone = || Utc::now() - chrono::Duration::seconds(1);
        let id = db
            .request_aggregation(&["LSA".into()], Interval::M15)
            .await
            .unwrap();

        // Claimed by node a: b cannot claim, renew or finish it.
        let r = db.claim_aggregate_request("a", later()).await.unwrap();
        assert_eq!(r.map(|r| r.id), Some(id.clone()), "{backend}");
        assert!(
            db.claim_aggregate_request("b", later())
                .await
                .unwrap()
                .is_none(),
            "{backend}"
        );
        assert!(
            !db.renew_aggregate_request(&id, "b", later()).await.unwrap(),
            "{backend}"
        );
        assert!(
            db.renew_aggregate_request(&id, "a", gone()).await.unwrap(),
            "{backend}"
        );
        assert!(
            !db.finish_aggregate_request(&id, "b", Ok("b ran it".into()))
                .await
                .unwrap(),
            "{backend}"
        );
        assert_eq!(
            db.aggregate_request(&id).await.unwrap().unwrap().state,
            "running"
        );

        // a's lease ran out (renewed into the past above): b takes it over,
        // and a's late finish changes nothing.
        let r = db.claim_aggregate_request("b", gone()).await.unwrap();
        assert_eq!(r.map(|r| r.id), Some(id.clone()), "{backend}");
        assert!(
            !db.finish_aggregate_request(&id, "a", Ok("a ran it".into()))
                .await
                .unwrap(),
            "{backend}"
        );
        // The third claim, by c, lets its lease run out too.
        let r = db.claim_aggregate_request("c", gone()).await.unwrap();
        assert_eq!(r.map(|r| r.id), Some(id.clone()), "{backend}");
        // Claimed 3 times without finishing: the next claim fails it.
        assert!(
            db.claim_aggregate_request("d", later())
                .await
                .unwrap()
                .is_none(),
            "{backend}"
        );
        let r = db.aggregate_request(&id).await.unwrap().unwrap();
        assert_eq!(r.state, "failed", "{backend}");
        assert!(
            r.outcome.contains("claimed 3 times"),
            "{backend}: {}",
            r.outcome
        );
        assert!(
            !db.finish_aggregate_request(&id, "c", Ok("c ran it".into()))
                .await
                .unwrap(),
            "{backend}"
        );

        // A request finished by its node is done with its summary.
        let id2 = db
            .request_aggregation(&["LSB".into()], Interval::M15)
            .await
            .unwrap();
        let r = db.claim_aggregate_request("e", later()).await.unwrap();
        assert_eq!(r.map(|r| r.id), Some(id2.clone()), "{backend}");
        assert!(
            db.finish_aggregate_request(&id2, "e", Ok("1 ticker".into()))
                .await
                .unwrap(),
            "{backend}"
        );
        let r = db.aggregate_request(&id2).await.unwrap().unwrap();
        assert_eq!((r.state.as_str(), r.outcome.as_str()), ("done", "1 ticker"));
        assert!(
            db.claim_aggregate_request("f", later())
                .await
                .unwrap()
                .is_none(),
            "{backend}"
        );
    }
}

/// Tickers at once: twice the node's cores, at most the PostgreSQL pool
/// less 2 (each load holds a connection for its whole COPY); SQLite has no
/// such pool.
#[test]
fn tickers_at_once_are_twice_the_cores_capped_by_the_pool() {
    use tickmesh_aggregate::aggregator::AggregatorArgs;
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut cfg, a) = rt.block_on(embedded(dir.path()));
    let parallel = |cfg: &tickmesh_core::config::ClusterConfig, cpus| {
        AggregatorArgs::of(
            cfg,
            Some(cpus),
            a.store.clone(),
            a.db.clone(),
            a.publisher.clone(),
        )
        .parallel
    };
    cfg.postgres.max_connections = 6;
    assert_eq!(parallel(&cfg, 1), 2);
    assert_eq!(parallel(&cfg, 8), 16, "embedded: no pool cap");
    cfg.cluster.backend = tickmesh_core::config::Backend::Distributed;
    assert_eq!(parallel(&cfg, 1), 2);
    assert_eq!(parallel(&cfg, 8), 4, "the pool (6) less 2");
    cfg.postgres.max_connections = 2;
    assert_eq!(parallel(&cfg, 8), 1, "at least one");
}
