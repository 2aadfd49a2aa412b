//! The promotion gate end to end (embedded backend, real training): the
//! trainer scores the champion on the new version's test window, the
//! coordinator promotes the new version only if it beats naive and the
//! champion there, and the predictor serves whatever is champion. Which
//! way a small fit goes is not known in advance, so the test reproduces
//! the verdict from the numbers and checks the system acted on it.

mod common;

use std::time::Duration;

use common::*;
use tickmesh_aggregate::aggregator;
use tickmesh_core::config::Role;
use tickmesh_core::types::Interval;
use tickmesh_model::checkpoint;
use tickmesh_proto::v1::{PromoteRequest, RetrainRequest};

const I: Interval = Interval::M15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrained_version_replaces_the_champion_only_if_it_beats_it_and_naive() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, a) = embedded(dir.path()).await;
    cfg.promotion.gate = true;
    store_synthetic(&a, "TSTG", "2024-04-01", "2024-04-19").await;
    let node = start(&cfg, &a, &[Role::Coordinator, Role::Train, Role::Serve]).await;
    aggregator::run(&aggregator_args(&a), &["TSTG".into()], I)
        .await
        .unwrap();
    let token = tickmesh::roles::client_admin_token(&cfg).unwrap();
    let addr = node.bound.coordinator.unwrap().to_string();
    let mut admin = tickmesh::roles::coordinator_link(&cfg, &addr, Some(&token))
        .unwrap()
        .admin()
        .unwrap();
    let http = format!("http://{}", node.bound.http.unwrap());
    let registered = |n: usize| {
        let db = a.db.clone();
        async move { db.models(Some("TSTG"), Some(I), true).await.unwrap().len() >= n }
    };
    eventually("v1 registered", Duration::from_secs(120), || registered(1)).await;
    let v1 = a.db.models(Some("TSTG"), Some(I), true).await.unwrap()[0].clone();
    println!("v1: {} ({})", v1.status, v1.metrics);
    // The first version competes with naive alone.
    let m1: serde_json::Value = serde_json::from_str(&v1.metrics).unwrap();
    assert!(m1["champion"].is_null(), "{m1}");
    let first = tickmesh_coordinator::gate::decide(&cfg.promotion, &v1.metrics, None);
    assert_eq!(
        v1.status,
        if first.promoted {
            "champion"
        } else {
            "rejected"
        }
    );
    if v1.status == "rejected" {
        // An operator may promote any registered version.
        admin
            .promote(PromoteRequest {
                ticker: "TSTG".into(),
                interval: I.to_string(),
                version: v1.version,
            })
            .await
            .unwrap();
    }

    // Retrain (longer, so another model): the new version is compared with
    // v1 on its own test window.
    admin
        .retrain(RetrainRequest {
            ticker: "TSTG".into(),
            interval: I.to_string(),
            epochs: 12,
        })
        .await
        .unwrap();
    eventually("v2 registered", Duration::from_secs(120), || registered(2)).await;
    let v2 =
        a.db.models(Some("TSTG"), Some(I), true)
            .await
            .unwrap()
            .into_iter()
            .find(|m| m.version != v1.version)
            .unwrap();
    println!("v2: {} ({})", v2.status, v2.metrics);
    let m2: serde_json::Value = serde_json::from_str(&v2.metrics).unwrap();
    assert_eq!(m2["champion"]["version"], v1.version, "{m2}");

    // The champion's score equals v1's checkpoint scored on v2's test window.
    let (meta1, w1) = checkpoint::read(a.store.as_ref(), "TSTG", I, v1.version, &v1.sha256)
        .await
        .unwrap();
    let (meta2, _) = checkpoint::read(a.store.as_ref(), "TSTG", I, v2.version, &v2.sha256)
        .await
        .unwrap();
    let rows =
        a.db.read_aggregated("TSTG", I, &meta1.features, None)
            .await
            .unwrap();
    let (from, to) = (meta2.splits.test_from, meta2.splits.test_to);
    let expected = tokio::task::spawn_blocking(move || {
        tickmesh_model::fit::evaluate_range(&meta1, &w1, &rows, Some(from), Some(to))
    })
    .await
    .unwrap()
    .unwrap()
    .expect("v1 has windows in v2's test range");
    assert_eq!((expected.from, expected.to), (from, to));
    assert_eq!(
        serde_json::to_value(expected.report).unwrap(),
        m2["champion"]["report"],
        "the champion scored on the challenger's window"
    );
    assert_eq!(
        expected.report.model.samples, meta2.metrics.model.samples,
        "the same bars as the challenger's test split"
    );

    // The verdict follows from the numbers, and the system acts on it.
    let verdict = tickmesh_coordinator::gate::decide(
        &cfg.promotion,
        &serde_json::json!({
            "model": m2["model"], "naive": m2["naive"], "champion": m2["champion"],
        })
        .to_string(),
        Some(v1.version),
    );
    assert_eq!(m2["gate"]["promoted"], verdict.promoted, "{m2}");
    assert_eq!(m2["gate"]["reason"], verdict.reason.as_str());
    let want_served = if verdict.promoted {
        assert_eq!(v2.status, "champion");
        v2.version
    } else {
        assert_eq!(v2.status, "rejected");
        v1.version
    };
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    loop {
        let b: serde_json::Value = client
            .get(format!(
                "{http}/ml/forecast?ticker=TSTG&interval=15m&n_steps=3"
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if b["model"]["version"] == want_served {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serving {} instead of v{want_served}",
            b["model"]["version"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // GET /ml/models/{ticker}: both versions, with status, verdict and job.
    let d: serde_json::Value = client
        .get(format!("{http}/ml/models/TSTG"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let versions = d["intervals"][0]["versions"].as_array().unwrap();
    let v2_row = versions
        .iter()
        .find(|v| v["version"] == v2.version)
        .unwrap();
    assert_eq!(v2_row["status"], v2.status.as_str());
    assert_eq!(v2_row["metrics"]["gate"]["reason"], verdict.reason.as_str());
    assert!(v2_row["job"].is_string(), "lineage: the training job {d}");
    assert_eq!(d["intervals"][0]["predictor"]["version"], want_served);
    // Admin lists the decisions as events, with the verdict's reason.
    let events = admin
        .list_model_events(tickmesh_proto::v1::ListModelEventsRequest {
            ticker: "TSTG".into(),
            interval: String::new(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let v2_event = events
        .iter()
        .find(|e| e.version == v2.version && e.node == "coordinator")
        .unwrap();
    assert_eq!(
        v2_event.kind,
        if verdict.promoted {
            "promoted"
        } else {
            "rejected"
        }
    );
    assert_eq!(v2_event.detail, verdict.reason);
    node.stop().await;
}
