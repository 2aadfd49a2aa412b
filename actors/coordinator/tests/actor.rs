//! The coordinator actor in process, on a real SQLite job table and a real
//! spool bus: the behaviours whose failure would be silent from outside.
//!
//! - A predictor port that joins the `predictors` group gets every
//!   champion; one that is stuck never holds up the actor.
//! - A job that its node stops listing in heartbeats has its attempt ended
//!   and is queued again.
//! - A trainer port that leaves the `trainers` group (its node's mesh
//!   session ended) takes its node out at once; its job moves to another
//!   node once its lease has run out, not before.
//! - A `start_model` record that cannot be recorded (the database is gone)
//!   is not committed: it stays in the spool to be read again.
//! - The retrain policy's drift trigger: a champion whose live error (as a
//!   serve node records it) exceeds `(1 + drift)` times its test error is
//!   retrained, once; one within the bound, or with a version trained
//!   since, is not.
//! - The promotion gate: a version that beats naive and the champion on
//!   its test window becomes champion and goes to the predictors; one that
//!   does not, or was compared with a champion that changed meanwhile, is
//!   kept as `rejected` with the reason, and the champion stays.

use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use ractor::{call_t, Actor, ActorProcessingErr, ActorRef};
use tickmesh_coordinator::coordinator::{
    CoordinatorActor, CoordinatorArgs, CoordinatorMsg, Registration,
};
use tickmesh_core::config::FeatureConfig;
use tickmesh_core::types::AggRow;
use tickmesh_core::types::{topics, Interval};
use tickmesh_io::bus::BusConfig;
use tickmesh_io::db::{Db, ModelVersion};
use tickmesh_io::supervision::RestartBudget;
use tickmesh_proto::mesh::{
    Assignment, CheckpointReport, ModelUpdate, PredictorPortMsg, Scope, TrainerPortMsg, PREDICTORS,
    TRAINERS,
};
use tokio::sync::mpsc;

const I: Interval = Interval::D1;

async fn db(dir: &std::path::Path, tickers: &[&str]) -> Db {
    let db = Db::open_sqlite(&dir.join("t.db")).await.unwrap();
    let row = AggRow {
        ts: Utc.with_ymd_and_hms(2024, 1, 2, 21, 0, 0).unwrap(),
        values: vec![Some(1.0); FeatureConfig::default().columns().len()],
    };
    for t in tickers {
        db.load_aggregated(
            t,
            I,
            &FeatureConfig::default().columns(),
            std::slice::from_ref(&row),
        )
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
        // Simulated trainers report no model metrics: the gate would reject them.
        promotion: tickmesh_core::config::PromotionConfig {
            gate: false,
            ..Default::default()
        },
        retrain: Default::default(),
        intake: None,
        budget: RestartBudget::new(Default::default()),
        health: None,
        scope: Scope::local(),
    }
}

/// A coordinator on a fresh database holding `tickers`, in a scope of its
/// own, ticking every `heartbeat`.
async fn coordinator(
    tickers: &[&str],
    heartbeat: Duration,
) -> (tempfile::TempDir, Db, Scope, ActorRef<CoordinatorMsg>) {
    let dir = tempfile::tempdir().unwrap();
    let db = db(dir.path(), tickers).await;
    let a = args(db.clone(), heartbeat);
    let scope = a.scope.clone();
    let (c, _) = Actor::spawn(None, CoordinatorActor, a).await.unwrap();
    (dir, db, scope, c)
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

/// A port in the `trainers` or `predictors` group that passes what it gets
/// to a channel, after `delay` per message.
struct Port<M>(std::marker::PhantomData<fn() -> M>);

struct PortArgs<M> {
    scope: Scope,
    group: &'static str,
    tx: mpsc::UnboundedSender<M>,
    delay: Duration,
}

impl<M: ractor::Message> Actor for Port<M> {
    type Msg = M;
    type State = PortArgs<M>;
    type Arguments = PortArgs<M>;

    async fn pre_start(
        &self,
        myself: ActorRef<M>,
        a: PortArgs<M>,
    ) -> Result<Self::State, ActorProcessingErr> {
        a.scope.join(a.group, myself.get_cell());
        Ok(a)
    }

    async fn handle(
        &self,
        _: ActorRef<M>,
        msg: M,
        a: &mut PortArgs<M>,
    ) -> Result<(), ActorProcessingErr> {
        tokio::time::sleep(a.delay).await;
        let _ = a.tx.send(msg);
        Ok(())
    }
}

async fn port<M: ractor::Message>(
    scope: &Scope,
    name: Option<String>,
    group: &'static str,
    delay: Duration,
) -> (ActorRef<M>, mpsc::UnboundedReceiver<M>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (p, _) = Actor::spawn(
        name,
        Port(std::marker::PhantomData),
        PortArgs {
            scope: scope.clone(),
            group,
            tx,
            delay,
        },
    )
    .await
    .unwrap();
    (p, rx)
}

/// `node`'s trainer port in `scope`, passing assignments to a channel.
async fn trainer(
    scope: &Scope,
    node: &str,
) -> (
    ActorRef<TrainerPortMsg>,
    mpsc::UnboundedReceiver<TrainerPortMsg>,
) {
    port(
        scope,
        Some(scope.trainer_port(node)),
        TRAINERS,
        Duration::ZERO,
    )
    .await
}

fn update(m: PredictorPortMsg) -> ModelUpdate {
    let PredictorPortMsg::Model(u) = m;
    u.into_result().unwrap()
}

fn assignment(m: TrainerPortMsg) -> Assignment {
    let TrainerPortMsg::Assign(a) = m;
    a.into_result().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predictor_that_joins_gets_every_champion_and_a_stuck_one_never_holds_up_the_coordinator()
{
    let dir = tempfile::tempdir().unwrap();
    let db = db(dir.path(), &[]).await;
    for v in 1..=3 {
        db.insert_model_version(&model(v)).await.unwrap();
    }
    for t in ["SLOWB", "SLOWC"] {
        db.insert_model_version(&ModelVersion {
            ticker: t.into(),
            ..model(1)
        })
        .await
        .unwrap();
    }
    let a = args(db, Duration::from_secs(5));
    let scope = a.scope.clone();
    let (c, _) = Actor::spawn(None, CoordinatorActor, a).await.unwrap();
    // One predictor that reads, one that takes a minute per message.
    let (_, mut reader) = port::<PredictorPortMsg>(&scope, None, PREDICTORS, Duration::ZERO).await;
    let (_, _stuck) =
        port::<PredictorPortMsg>(&scope, None, PREDICTORS, Duration::from_secs(60)).await;
    // Joining, each gets the champions of SLOW (v3), SLOWB and SLOWC.
    let mut first = Vec::new();
    for _ in 0..3 {
        let u = tokio::time::timeout(Duration::from_secs(5), reader.recv())
            .await
            .expect("the champions reach a predictor that joins")
            .map(update)
            .unwrap();
        first.push((u.ticker, u.version));
    }
    first.sort();
    assert_eq!(
        first,
        [("SLOW".into(), 3), ("SLOWB".into(), 1), ("SLOWC".into(), 1)]
    );
    // Each champion change is cast to every predictor; the stuck one
    // never holds the coordinator up.
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
        .expect("the coordinator answers while a predictor is stuck")
        .unwrap();
        assert_eq!(m.version, v);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        let u = tokio::time::timeout(Duration::from_secs(5), reader.recv())
            .await
            .unwrap()
            .map(update)
            .unwrap();
        assert_eq!((u.ticker.as_str(), u.version), ("SLOW", v));
    }
    c.stop(None);
}

async fn register(c: &ActorRef<CoordinatorMsg>, node: &str) {
    register_with(c, node, 0, 1).await
}

async fn register_with(c: &ActorRef<CoordinatorMsg>, node: &str, gpus: u32, slots: u32) {
    call_t!(
        c,
        |reply| CoordinatorMsg::Register {
            reg: Registration {
                node: node.into(),
                roles: vec!["train".into()],
                cpus: 1,
                gpus,
                slots,
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

async fn start(c: &ActorRef<CoordinatorMsg>, ticker: &str) {
    let started = call_t!(
        c,
        |reply| CoordinatorMsg::Start {
            tickers: vec![ticker.into()],
            interval: I,
            model: None,
            epochs: None,
            reply: Some(reply)
        },
        2_000
    )
    .unwrap();
    assert_eq!(started.queued, 1, "{started:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_fills_gpu_nodes_first_then_the_node_with_the_most_free_slots() {
    let tickers = ["PLA", "PLB", "PLC", "PLD", "PLE", "PLF", "PLG"];
    let (_dir, _, scope, c) = coordinator(&tickers, Duration::from_secs(5)).await;
    // A GPU node with 2 slots, CPU nodes with 3 and 1 (cluster.toml's
    // `gpus` and `jobs`, as the pools register them).
    let mut rx = Vec::new();
    for (node, gpus, slots) in [("gpu", 1, 2), ("big", 0, 3), ("small", 0, 1)] {
        let (p, r) = trainer(&scope, node).await;
        register_with(&c, node, gpus, slots).await;
        rx.push((node, p, r));
    }
    let mut order = Vec::new();
    for t in tickers {
        start(&c, t).await;
        // Where this job went.
        let mut got = None;
        for _ in 0..100 {
            for (node, _, r) in rx.iter_mut() {
                if let Ok(m) = r.try_recv() {
                    got = Some((assignment(m).ticker, *node));
                }
            }
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        order.push(got.unwrap_or((t.to_string(), "none")));
    }
    let nodes: Vec<&str> = order.iter().map(|(_, n)| *n).collect();
    // GPU first (2 slots); then the most free slots: big (3 free), then big
    // (2) or small (1) by free slots, ties by name; full nodes get nothing,
    // and the seventh job waits.
    assert_eq!(
        nodes,
        ["gpu", "gpu", "big", "big", "big", "small", "none"],
        "{order:?}"
    );
    c.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_its_node_stops_listing_is_taken_back_and_queued_again() {
    let hb = Duration::from_millis(100);
    let (_dir, db, scope, c) = coordinator(&["HBX"], hb).await;
    let (_p, mut rx) = trainer(&scope, "n1").await;
    register(&c, "n1").await;
    start(&c, "HBX").await;
    let a = assignment(rx.recv().await.unwrap());
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
        .map(assignment)
        .unwrap();
    assert_eq!(again.job_id, a.job_id);
    assert!(again.epoch > a.epoch);
    c.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trainer_port_that_leaves_takes_its_node_out_at_once_and_its_job_moves_after_the_lease() {
    let hb = Duration::from_millis(100);
    let (_dir, db, scope, c) = coordinator(&["LVX"], hb).await;
    let (p1, mut rx1) = trainer(&scope, "lvx-a").await;
    register(&c, "lvx-a").await;
    start(&c, "LVX").await;
    let a = assignment(rx1.recv().await.unwrap());
    // A second node; then the first one's port leaves (its mesh session ended).
    let (_p2, mut rx2) = trainer(&scope, "lvx-b").await;
    register(&c, "lvx-b").await;
    p1.stop_and_wait(None, None).await.unwrap();
    let left = Instant::now();
    let nodes = loop {
        let nodes = call_t!(c, CoordinatorMsg::ListNodes, 2_000).unwrap();
        if nodes.iter().all(|n| n.node != "lvx-a") {
            break nodes;
        }
        assert!(left.elapsed() < Duration::from_secs(1), "{nodes:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    // The job is not moved before its lease (20 heartbeats) runs out: the
    // node may only be cut off, still training.
    let moved = loop {
        // lvx-b stays alive (heartbeats) meanwhile.
        call_t!(
            c,
            |reply| CoordinatorMsg::Heartbeat {
                node: "lvx-b".into(),
                incarnation: 7,
                held: Vec::new(),
                reply
            },
            2_000
        )
        .unwrap()
        .unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(hb, rx2.recv()).await {
            break assignment(m);
        }
        assert!(left.elapsed() < Duration::from_secs(10), "never moved");
    };
    assert!(
        left.elapsed() >= hb * 20 - Duration::from_millis(300),
        "moved {:?} after the node left, before its lease ran out",
        left.elapsed()
    );
    assert_eq!(moved.job_id, a.job_id);
    assert!(moved.epoch > a.epoch);
    let attempts = db.attempts("LVX", I).await.unwrap();
    assert!(attempts[0].reason.contains("lease"), "{attempts:?}");
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

/// Trains `ticker` once through the actor: start, the assignment, and a
/// checkpoint report carrying `metrics` (as a trainer would send it).
async fn train_once(
    c: &ActorRef<CoordinatorMsg>,
    rx: &mut mpsc::UnboundedReceiver<TrainerPortMsg>,
    ticker: &str,
    metrics: serde_json::Value,
) -> i64 {
    start(c, ticker).await;
    let a = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("assigned")
        .map(assignment)
        .unwrap();
    let ack = call_t!(
        c,
        |reply| CoordinatorMsg::Report {
            report: CheckpointReport {
                node: "g1".into(),
                ticker: ticker.into(),
                interval: I.to_string(),
                epoch: a.epoch,
                version: a.version,
                uri: format!("file:///models/{ticker}/1d/v{}", a.version),
                sha256: "00".repeat(32),
                kind: "lstm_attention".into(),
                metrics_json: metrics.to_string(),
                job_id: a.job_id.clone(),
            },
            reply
        },
        5_000
    )
    .unwrap();
    assert!(ack.accepted, "{ack:?}");
    a.version
}

fn scores(model: f64, naive: f64, champion: Option<(i64, f64)>) -> serde_json::Value {
    let mut v = serde_json::json!({ "model": { "rmse": model }, "naive": { "rmse": naive } });
    if let Some((version, rmse)) = champion {
        v["champion"] =
            serde_json::json!({ "version": version, "report": { "model": { "rmse": rmse } } });
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_promotes_only_a_version_that_beats_naive_and_the_champion() {
    let dir = tempfile::tempdir().unwrap();
    let db = db(dir.path(), &["GATE"]).await;
    let mut a = args(db.clone(), Duration::from_secs(5));
    a.promotion = tickmesh_core::config::PromotionConfig::default();
    assert!(a.promotion.gate, "the gate is on by default");
    let scope = a.scope.clone();
    let (c, _) = Actor::spawn(None, CoordinatorActor, a).await.unwrap();
    let (_t, mut trainer_rx) = trainer(&scope, "g1").await;
    register(&c, "g1").await;
    let (_p, mut predictor) =
        port::<PredictorPortMsg>(&scope, None, PREDICTORS, Duration::ZERO).await;
    let status = |v: i64| {
        let db = db.clone();
        async move {
            let all = db.models(Some("GATE"), Some(I), true).await.unwrap();
            let m = all.into_iter().find(|m| m.version == v).unwrap();
            let gate: serde_json::Value = serde_json::from_str(&m.metrics).unwrap();
            (
                m.status,
                gate["gate"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };
    let pushed = |rx: &mut mpsc::UnboundedReceiver<PredictorPortMsg>| {
        let got = rx.try_recv().ok().map(update);
        got.map(|u| u.version)
    };

    // A first version that loses to naive: rejected, nothing to serve.
    let v1 = train_once(&c, &mut trainer_rx, "GATE", scores(1.05, 1.0, None)).await;
    let (st, why) = status(v1).await;
    assert_eq!(st, "rejected");
    assert!(why.contains("does not beat naive"), "{why}");
    // One that beats naive: champion, pushed to the predictors.
    let v2 = train_once(&c, &mut trainer_rx, "GATE", scores(0.9, 1.0, None)).await;
    assert_eq!(status(v2).await.0, "champion");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pushed(&mut predictor), Some(v2));
    // A challenger better than naive but worse than the champion on the
    // same window: rejected, the champion stays and nothing is pushed.
    let v3 = train_once(
        &c,
        &mut trainer_rx,
        "GATE",
        scores(0.95, 1.0, Some((v2, 0.9))),
    )
    .await;
    let (st, why) = status(v3).await;
    assert_eq!(st, "rejected");
    assert!(why.contains("does not beat the champion"), "{why}");
    assert_eq!(status(v2).await.0, "champion");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pushed(&mut predictor), None);
    // A better one: promoted; the old champion is retired.
    let v4 = train_once(
        &c,
        &mut trainer_rx,
        "GATE",
        scores(0.8, 1.0, Some((v2, 0.9))),
    )
    .await;
    assert_eq!(status(v4).await.0, "champion");
    assert_eq!(status(v2).await.0, "retired");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(pushed(&mut predictor), Some(v4));
    // Compared with a champion that is no longer the champion: rejected.
    let v5 = train_once(
        &c,
        &mut trainer_rx,
        "GATE",
        scores(0.1, 1.0, Some((v2, 0.9))),
    )
    .await;
    let (st, why) = status(v5).await;
    assert_eq!(st, "rejected");
    assert!(
        why.contains("the champion changed while it trained"),
        "{why}"
    );
    assert_eq!(status(v4).await.0, "champion");
    // A rollback never picks a rejected version: it goes back to v2.
    let m = call_t!(
        c,
        |reply| CoordinatorMsg::ChangeChampion {
            ticker: "GATE".into(),
            interval: I,
            version: None,
            reply
        },
        2_000
    )
    .unwrap()
    .unwrap();
    assert_eq!(m.version, v2);
    // Each decision is an event, newest first, with its reason.
    let events = db.model_events(Some("GATE"), Some(I), 100).await.unwrap();
    let seen: Vec<(i64, &str)> = events
        .iter()
        .map(|e| (e.version, e.kind.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (v2, "rolled_back"),
            (v5, "rejected"),
            (v4, "promoted"),
            (v3, "rejected"),
            (v2, "promoted"),
            (v1, "rejected"),
        ]
    );
    assert!(
        events[1]
            .detail
            .contains("the champion changed while it trained"),
        "{events:?}"
    );
    assert!(
        events[0].detail.contains(&format!("from v{v4}")),
        "{events:?}"
    );
    assert!(events.iter().all(|e| e.node == "coordinator"));
    c.stop(None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_of_the_live_error_retrains_a_champion_once() {
    let dir = tempfile::tempdir().unwrap();
    let tickers = ["DRIFTA", "DRIFTB", "DRIFTC"];
    let db = db(dir.path(), &tickers).await;
    let data_to = Utc.with_ymd_and_hms(2024, 1, 2, 21, 0, 0).unwrap();
    let metrics = serde_json::json!({
        "model": { "rmse": 1.0 }, "naive": { "rmse": 1.1 },
        "data": { "from": data_to, "to": data_to, "rows": 100 },
    })
    .to_string();
    let live = |t: &str, v: i64, rmse: f64| tickmesh_io::db::LiveError {
        ticker: t.into(),
        interval: I,
        version: v,
        bars: 30,
        rmse,
        through: data_to + chrono::Duration::days(3),
    };
    for t in tickers {
        db.insert_model_version(&ModelVersion {
            ticker: t.into(),
            metrics: metrics.clone(),
            ..model(1)
        })
        .await
        .unwrap();
    }
    // A: live error 1.2 times the test error, within the bound of 1.5.
    db.record_live_error(&live("DRIFTA", 1, 1.2)).await.unwrap();
    // B: twice the test error, but a version was trained since (rejected).
    db.record_live_error(&live("DRIFTB", 1, 2.0)).await.unwrap();
    db.insert_model_version(&ModelVersion {
        ticker: "DRIFTB".into(),
        status: "rejected".into(),
        metrics: metrics.clone(),
        ..model(2)
    })
    .await
    .unwrap();
    // C: twice the test error: retrained.
    db.record_live_error(&live("DRIFTC", 1, 2.0)).await.unwrap();

    let mut a = args(db.clone(), Duration::from_millis(100));
    a.retrain = tickmesh_core::config::RetrainConfig {
        drift: 0.5,
        drift_bars: 30,
        poll_secs: 1,
        ..Default::default()
    };
    let scope = a.scope.clone();
    let (c, _) = Actor::spawn(None, CoordinatorActor, a).await.unwrap();
    let (_t, mut rx) = trainer(&scope, "d1").await;
    register(&c, "d1").await;
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a drift retrain")
        .map(assignment)
        .unwrap();
    assert_eq!(first.ticker, "DRIFTC");
    assert_eq!(first.model, "gru", "the champion's kind");
    // Nothing for A or B over a few more looks.
    let more = tokio::time::timeout(Duration::from_secs(3), rx.recv()).await;
    assert!(
        more.is_err(),
        "unexpected job: {:?}",
        more.map(|m| m.map(assignment))
    );
    c.stop(None);
}
