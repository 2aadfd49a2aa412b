//! The coordinator actor in process, on a real SQLite job table and a real
//! spool bus: the behaviours whose failure would be silent from outside.
//!
//! - A predictor that stops reading its model stream is dropped; the actor
//!   keeps answering (it once awaited the send inside its handler).
//! - A job that its node stops listing in heartbeats has its attempt ended
//!   and is queued again.
//! - A `start_model` record that cannot be recorded (the database is gone)
//!   is not committed: it stays in the spool to be read again.

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use ractor::{call_t, Actor, ActorRef};
use tickmesh_coordinator::coordinator::{
    CoordinatorActor, CoordinatorArgs, CoordinatorMsg, Registration,
};
use tickmesh_core::bus::BusConfig;
use tickmesh_core::config::FEATURE_COLUMNS;
use tickmesh_core::db::{AggRow, Db, ModelVersion};
use tickmesh_core::supervision::RestartBudget;
use tickmesh_core::types::{topics, Interval};
use tokio::sync::mpsc;

const I: Interval = Interval::D1;

async fn db(dir: &std::path::Path, tickers: &[&str]) -> Db {
    let db = Db::open_sqlite(&dir.join("t.db")).await.unwrap();
    let row = AggRow {
        ts: Utc.with_ymd_and_hms(2024, 1, 2, 21, 0, 0).unwrap(),
        values: vec![Some(1.0); FEATURE_COLUMNS.len()],
    };
    for t in tickers {
        db.load_aggregated(t, I, std::slice::from_ref(&row))
            .await
            .unwrap();
    }
    db
}

fn args(db: Db, heartbeat: Duration) -> CoordinatorArgs {
    CoordinatorArgs {
        db,
        heartbeat,
        lease: heartbeat * 20,
        max_attempts: 5,
        retry_backoff: Duration::from_millis(10),
        max_open_jobs: 100,
        intake: None,
        budget: RestartBudget::new(Default::default()),
        health: None,
    }
}

fn model(version: i64) -> ModelVersion {
    ModelVersion {
        ticker: "SLOW".into(),
        interval: I,
        version,
        kind: "gru".into(),
        uri: format!("file:///models/SLOW/1d/v{version}"),
        sha256: "00".repeat(32),
        metrics: "{}".into(),
        status: "champion".into(),
        created_at: Utc::now(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predictor_that_stops_reading_is_dropped_and_the_coordinator_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let db = db(dir.path(), &[]).await;
    for v in 1..=3 {
        db.insert_model_version(&model(v)).await.unwrap();
    }
    // More champions than the watcher has room for: sending them must not
    // hold up the actor.
    for t in ["SLOWB", "SLOWC"] {
        db.insert_model_version(&ModelVersion {
            ticker: t.into(),
            ..model(1)
        })
        .await
        .unwrap();
    }
    let (c, _) = Actor::spawn(None, CoordinatorActor, args(db, Duration::from_secs(5)))
        .await
        .unwrap();
    // A watcher with room for one update that never reads.
    let (tx, mut rx) = mpsc::channel(1);
    c.cast(CoordinatorMsg::WatchModels { tx }).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Each champion change is pushed to watchers; the full one is dropped.
    for v in [1, 2, 1, 2] {
        let t = Instant::now();
        let m = call_t!(
            c,
            |reply| CoordinatorMsg::ChangeChampion {
                ticker: "SLOW".into(),
                interval: I,
                version: Some(v),
                reply
            },
            2_000
        )
        .expect("the coordinator answers while a watcher is stuck")
        .unwrap();
        assert_eq!(m.version, v);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    // Reading now: the three champions it was owed when it connected (sent
    // by a task as it reads), at most the one update that fitted, then the
    // end of the stream: the coordinator dropped it.
    let mut got = 0;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(_)) => got += 1,
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    assert!(ended, "the stuck watcher was never dropped");
    assert!((3..=4).contains(&got), "{got} messages");
    c.stop(None);
}

async fn register(c: &ActorRef<CoordinatorMsg>, node: &str) {
    call_t!(
        c,
        |reply| CoordinatorMsg::Register {
            reg: Registration {
                node: node.into(),
                roles: vec!["train".into()],
                cpus: 1,
                gpus: 0,
                slots: 1,
                incarnation: 7,
                running: Vec::new(),
            },
            reply
        },
        2_000
    )
    .unwrap()
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_its_node_stops_listing_is_taken_back_and_queued_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = db(dir.path(), &["HBX"]).await;
    let hb = Duration::from_millis(100);
    let (c, _) = Actor::spawn(None, CoordinatorActor, args(db.clone(), hb))
        .await
        .unwrap();
    register(&c, "n1").await;
    let (tx, mut rx) = mpsc::channel(8);
    call_t!(
        c,
        |reply| CoordinatorMsg::WatchAssignments {
            node: "n1".into(),
            incarnation: 7,
            tx,
            reply
        },
        2_000
    )
    .unwrap()
    .unwrap();
    let started = call_t!(
        c,
        |reply| CoordinatorMsg::Start {
            tickers: vec!["HBX".into()],
            interval: I,
            model: None,
            epochs: None,
            reply: Some(reply)
        },
        2_000
    )
    .unwrap();
    assert_eq!(started.queued, 1);
    let a = rx.recv().await.unwrap().unwrap();
    assert_eq!(a.ticker, "HBX");
    // Heartbeats that hold nothing: after the grace (two heartbeats) the
    // attempt ends and the job goes back to the queue (and to n1 again, the
    // only node, under a higher epoch).
    let t = Instant::now();
    loop {
        let out = call_t!(
            c,
            |reply| CoordinatorMsg::Heartbeat {
                node: "n1".into(),
                incarnation: 7,
                held: Vec::new(),
                reply
            },
            2_000
        )
        .unwrap()
        .unwrap();
        assert!(out.registered);
        let attempts = db.attempts("HBX", I).await.unwrap();
        if attempts.first().is_some_and(|a| a.ended_at.is_some()) {
            assert!(
                attempts[0].reason.contains("no longer holds the job"),
                "{attempts:?}"
            );
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "never taken back");
        tokio::time::sleep(hb).await;
    }
    let again = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("reassigned")
        .unwrap()
        .unwrap();
    assert_eq!(again.job_id, a.job_id);
    assert!(again.epoch > a.epoch);
    c.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_model_the_database_cannot_record_is_not_committed() {
    let dir = tempfile::tempdir().unwrap();
    let db = db(dir.path(), &["DBX"]).await;
    let bus = BusConfig::Spool {
        root: dir.path().join("raw"),
    };
    let publisher = bus.publisher().unwrap();
    let mut a = args(db.clone(), Duration::from_secs(5));
    a.intake = Some((bus.clone(), publisher.clone()));
    a.budget = RestartBudget::new(tickmesh_core::config::SupervisionConfig {
        max_restarts: 2,
        backoff_ms: 10,
        ..Default::default()
    });
    let (c, h) = Actor::spawn(None, CoordinatorActor, a).await.unwrap();
    // The database goes away while the coordinator runs; then a
    // start_model arrives: the consumer asks, the job cannot be recorded.
    let Db::Sqlite(pool) = &db else {
        unreachable!()
    };
    pool.close().await;
    let msg = serde_json::json!({
        "interval": "1d",
        "tickers": ["DBX"],
        "watermark": "2024-01-02T21:00:00Z",
    });
    publisher
        .publish(topics::START_MODEL, "DBX", msg.to_string().as_bytes(), &[])
        .await
        .unwrap();
    assert_eq!(bus.spool_pending(topics::START_MODEL), Some(1));
    // The consumer fails on the record each time it reads it, is restarted
    // within the budget, and then the coordinator gives up.
    tokio::time::timeout(Duration::from_secs(20), h)
        .await
        .expect("the coordinator stops once its consumer's budget is spent")
        .unwrap();
    assert_eq!(
        bus.spool_pending(topics::START_MODEL),
        Some(1),
        "the record was not committed: it is read again after a restart"
    );
    drop(c);
}
