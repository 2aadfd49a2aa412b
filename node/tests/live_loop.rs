//! The live loop end to end on the real broker, S3 server and PostgreSQL
//! (`scripts/services.sh up`), in one node with every role and the
//! promotion gate on:
//!
//! bars replayed into `live_bars` (`produce::replay`) → the ingest role and
//! live aggregation append the rows → the retrain policy (`[retrain]
//! every_bars`) queues a job → the trainer (warm-started from the champion)
//! → the gate → the predictor.
//!
//! The ticker's closes follow a sine wave (a pattern a model can learn and
//! the naive forecast cannot), so an honest model beats naive. The
//! deliberately worse models are trained on shuffled targets
//! (`TICKMESH_FAILPOINT_SHUFFLE_TARGETS`):
//!
//! 1. v1 (shuffled) is trained on five days of history; an operator makes it
//!    champion if the gate did not.
//! 2. A sixth day replayed live makes the policy retrain: v2 (honest, warm
//!    started from v1) beats v1 and naive on its test window, is promoted
//!    and served.
//! 3. A seventh day: v3 (shuffled) is rejected with its reason; v2 serves on.
//! 4. A rollback through the HTTP API puts v1 back, and it is served.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{Duration as Minutes, NaiveDate};
use common::*;
use tickmesh_aggregate::aggregator;
use tickmesh_core::types::{Bar, Interval};
use tickmesh_ingest::producer::{self, Speed};
use tickmesh_io::store::LocalStore;
use tickmesh_model::checkpoint;
use tickmesh_proto::v1::PromoteRequest;

const T: &str = "WAVE";
const I: Interval = Interval::M15;

/// Minute bars of one session whose closes follow a sine wave of a two-hour
/// period (eight 15-minute bars), continuing across days.
fn sine_day(day: NaiveDate, minute0: i64) -> Vec<Bar> {
    let (open, close) = tickmesh_core::calendar::session(day).expect("a trading day");
    let mut bars = Vec::new();
    let mut t = open;
    let mut k = minute0;
    let price = |k: i64| 100.0 + 3.0 * (2.0 * std::f64::consts::PI * k as f64 / 120.0).sin();
    while t < close {
        let (o, c) = (price(k - 1), price(k));
        bars.push(Bar {
            t,
            o,
            h: o.max(c) + 0.01,
            l: o.min(c) - 0.01,
            c,
            v: 1_000 + (k % 7) as u64 * 10,
            n: 10,
            vw: (o + c) / 2.0,
        });
        t += Minutes::minutes(1);
        k += 1;
    }
    bars
}

fn days() -> Vec<NaiveDate> {
    // Seven trading days: 2024-05-06 (a Monday) to 2024-05-14.
    let mut d: NaiveDate = "2024-05-06".parse().unwrap();
    let mut out = Vec::new();
    while out.len() < 7 {
        if tickmesh_core::calendar::session(d).is_some() {
            out.push(d);
        }
        d = d.succ_opt().unwrap();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_bars_retrain_the_gate_decides_and_a_rollback_restores() {
    let (mut cfg, a) = distributed("liveloop").await;
    cfg.promotion.gate = true;
    cfg.aggregate.live = true;
    cfg.aggregate.intervals = vec![I];
    cfg.retrain.every_bars = 26; // one session of 15-minute bars
    cfg.retrain.poll_secs = 1;
    // Enough steps for the small model to learn the wave (a few windows
    // make two batches an epoch).
    cfg.train.epochs = 150;
    cfg.train.patience = 150;
    cfg.train.learning_rate = 0.01;
    // Bars: five days of history in S3, the next two in an archive to replay.
    let dir = tempfile::tempdir().unwrap();
    let archive = LocalStore::open(dir.path().join("archive")).unwrap();
    let mut live = BTreeMap::new();
    let mut minute = 0;
    for (i, day) in days().into_iter().enumerate() {
        let bars = sine_day(day, minute);
        minute += bars.len() as i64;
        for msg in producer::weekly_messages(T, &bars) {
            if i < 5 {
                tickmesh_ingest::bars_consumer::write_bars(a.store.as_ref(), &msg)
                    .await
                    .unwrap();
            } else {
                tickmesh_ingest::bars_consumer::write_bars(&archive, &msg)
                    .await
                    .unwrap();
            }
        }
        if i >= 5 {
            live.insert(day, bars);
        }
    }
    let node = start(&cfg, &a, &ALL_ROLES).await;
    let token = tickmesh::roles::client_admin_token(&cfg).unwrap();
    let addr = node.bound.coordinator.unwrap().to_string();
    let mut admin = tickmesh::roles::coordinator_link(&cfg, &addr, Some(&token))
        .unwrap()
        .admin()
        .unwrap();
    let http = format!("http://{}", node.bound.http.unwrap());
    let client = reqwest::Client::new();
    let versions = || {
        let db = a.db.clone();
        async move { db.models(Some(T), Some(I), true).await.unwrap() }
    };
    let wait_versions = |n: usize, what: &'static str| async move {
        eventually(what, Duration::from_secs(180), || async move {
            versions().await.len() >= n
        })
        .await;
        let mut v = versions().await;
        v.sort_by_key(|m| m.version);
        v
    };
    let served = |want: i64| {
        let (client, http) = (client.clone(), http.clone());
        async move {
            let started = std::time::Instant::now();
            loop {
                let r = client
                    .get(format!(
                        "{http}/ml/forecast?ticker={T}&interval=15m&n_steps=3"
                    ))
                    .send()
                    .await
                    .unwrap();
                if r.status() == 200 {
                    let b: serde_json::Value = r.json().await.unwrap();
                    if b["model"]["version"] == want {
                        return;
                    }
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "v{want} never served"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let gate = |m: &tickmesh_io::db::ModelVersion| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&m.metrics).unwrap()["gate"].clone()
    };

    // 1. v1, deliberately worse, on the history (the batch run publishes start_model).
    std::env::set_var("TICKMESH_FAILPOINT_SHUFFLE_TARGETS", T);
    aggregator::run(&aggregator_args(&a), &[T.into()], I)
        .await
        .unwrap();
    let v = wait_versions(1, "v1 registered").await;
    let v1 = v[0].clone();
    println!("v1 {}: {}", v1.status, gate(&v1));
    if v1.status != "champion" {
        admin
            .promote(PromoteRequest {
                ticker: T.into(),
                interval: I.to_string(),
                version: v1.version,
            })
            .await
            .unwrap();
    }
    served(v1.version).await;

    // 2. A sixth day, live: the policy retrains, honestly this time.
    std::env::remove_var("TICKMESH_FAILPOINT_SHUFFLE_TARGETS");
    let day6: BTreeMap<String, Vec<Bar>> =
        [(T.to_string(), live.values().next().unwrap().clone())].into();
    producer::replay(a.publisher.as_ref(), &day6, Speed::Max, |_| {})
        .await
        .unwrap();
    let v = wait_versions(2, "v2 registered (a retrain on live rows)").await;
    let v2 = v[1].clone();
    println!("v2 {}: {}", v2.status, gate(&v2));
    assert_eq!(
        v2.status,
        "champion",
        "an honest model beats the shuffled one and naive: {}",
        gate(&v2)
    );
    let m2: serde_json::Value = serde_json::from_str(&v2.metrics).unwrap();
    assert_eq!(m2["champion"]["version"], v1.version, "compared with v1");
    let (meta2, _) = checkpoint::read(a.store.as_ref(), T, I, v2.version, &v2.sha256)
        .await
        .unwrap();
    assert_eq!(
        meta2.warm_start_from,
        Some(v1.version),
        "warm-started from the champion"
    );
    assert_eq!(
        meta2.data.to,
        live.values().next().unwrap().last().unwrap().t - Minutes::minutes(14),
        "trained on the live day's rows (its last bucket starts at 15:45)"
    );
    served(v2.version).await;

    // 3. A seventh day: the policy retrains, deliberately worse: rejected.
    std::env::set_var("TICKMESH_FAILPOINT_SHUFFLE_TARGETS", T);
    let day7: BTreeMap<String, Vec<Bar>> =
        [(T.to_string(), live.values().nth(1).unwrap().clone())].into();
    producer::replay(a.publisher.as_ref(), &day7, Speed::Max, |_| {})
        .await
        .unwrap();
    let v = wait_versions(3, "v3 registered").await;
    std::env::remove_var("TICKMESH_FAILPOINT_SHUFFLE_TARGETS");
    let v3 = v[2].clone();
    println!("v3 {}: {}", v3.status, gate(&v3));
    assert_eq!(v3.status, "rejected");
    assert!(
        gate(&v3)["reason"]
            .as_str()
            .unwrap()
            .contains("does not beat"),
        "{}",
        gate(&v3)
    );
    assert_eq!(
        versions()
            .await
            .iter()
            .find(|m| m.version == v2.version)
            .unwrap()
            .status,
        "champion"
    );
    served(v2.version).await;

    // 4. A rollback through the HTTP API: v1 is back.
    let r = client
        .post(format!("{http}/ml/models/{T}/15m/rollback"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    served(v1.version).await;
    let after = versions().await;
    let status = |v: i64| {
        after
            .iter()
            .find(|m| m.version == v)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(
        (status(v1.version), status(v2.version), status(v3.version)),
        ("champion".into(), "rolled_back".into(), "rejected".into())
    );
    node.stop().await;
}
