//! `POST /ml/train` → `GET /ml/train/{id}` reaches `done` → `GET
//! /ml/forecast` serves the new version; a job that cannot train reaches
//! `failed` with the reason and does not hold up the jobs behind it; bad
//! parameters get a 400 and an unknown ticker a 404, in JSON. On the
//! embedded defaults (SQLite, a local object directory, the file spool).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tickmesh_aggregate::aggregator;
use tickmesh_core::config::Role;
use tickmesh_core::types::Interval;

async fn job_until(client: &reqwest::Client, url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let v: Value = r.json().await.unwrap();
        if seen.last() != Some(&v["state"]) {
            seen.push(v["state"].clone());
        }
        if done(&v) {
            return v;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "{url}: states seen {seen:?}, last {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_train_then_status_then_forecast_serves_the_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cfg, a) = embedded(dir.path()).await;
    // Every request re-reads the stored rows: the test checks that the next
    // forecast after a revision starts from it (by default a forecast sees
    // the rows at most `history_refresh_ms` late).
    cfg.serve.history_refresh_ms = 0;
    store_synthetic(&a, "APIT", "2024-04-01", "2024-04-12").await;
    // One day of 15-minute bars: 26 rows, too few windows to train.
    store_synthetic(&a, "TINY", "2024-04-01", "2024-04-01").await;
    let node = start(&cfg, &a, &[Role::Coordinator, Role::Train, Role::Serve]).await;
    // Loads aggregated_data and publishes start_model: a first version trains on its own.
    let args = aggregator_args(&a);
    aggregator::run(&args, &["APIT".into(), "TINY".into()], Interval::M15)
        .await
        .unwrap();

    let http = node.bound.http.unwrap();
    let client = reqwest::Client::new();
    // The embedded coordinator's admin token; without it (or with another)
    // POST /ml/train is 401 and queues nothing.
    let token = std::fs::read_to_string(cfg.embedded_token_path())
        .unwrap()
        .trim()
        .to_string();
    for auth in [None, Some("a-wrong-admin-token-value")] {
        let mut req = client.post(format!("http://{http}/ml/train?ticker=APIT&interval=15m"));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(
            r.status().as_u16(),
            401,
            "{auth:?}: {}",
            r.text().await.unwrap()
        );
    }
    let post = |q: &str| {
        let url = format!("http://{http}/ml/train?{q}");
        let (c, token) = (client.clone(), token.clone());
        async move {
            let r = c.post(&url).bearer_auth(&token).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };

    // The first version (from start_model) is served before the API is
    // tried, so the versions below are known: the API's job makes v2.
    let models = format!("http://{http}/ml/models");
    let started = Instant::now();
    loop {
        let v: Value = client
            .get(&models)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["ticker"] == "APIT" && m["state"] == "serving")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "APIT v1 never served: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A job that cannot train fails with the reason, and is not stuck.
    let (s, v) = post("ticker=TINY&interval=15m&epochs=2").await;
    assert_eq!(s, 202, "{v}");
    let tiny = v["job"].as_str().unwrap().to_string();

    let (s, v) = post("ticker=apit&interval=15m&epochs=2&model=gru").await;
    assert_eq!(s, 202, "{v}");
    let id = v["job"].as_str().unwrap().to_string();

    let failed = job_until(&client, &format!("http://{http}/ml/train/{tiny}"), |v| {
        v["state"] != "queued" && v["state"] != "running"
    })
    .await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["reason"].as_str().unwrap().contains("too few rows"),
        "{failed}"
    );

    // A later job for the failed ticker is not blocked by the failure either.
    let (s, v) = post("ticker=TINY&interval=15m&epochs=1").await;
    assert_eq!(s, 202, "{v}");
    let again = v["job"].as_str().unwrap().to_string();
    let failed = job_until(&client, &format!("http://{http}/ml/train/{again}"), |v| {
        v["state"] != "queued" && v["state"] != "running"
    })
    .await;
    assert_eq!(failed["state"], "failed", "{failed}");

    let status_url = format!("http://{http}/ml/train/{id}");
    let running = job_until(&client, &status_url, |v| {
        v["state"] == "done" || (v["state"] == "running" && v["epoch"].as_u64() >= Some(1))
    })
    .await;
    if running["state"] == "running" {
        assert_eq!(running["epochs"], 2, "{running}");
        assert!(running["train_loss"].as_f64().unwrap() > 0.0, "{running}");
        assert!(running["val_loss"].as_f64().unwrap() > 0.0, "{running}");
    }
    let done = job_until(&client, &status_url, |v| {
        v["state"] != "running" && v["state"] != "queued"
    })
    .await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["ticker"], "APIT");
    assert_eq!(done["model"], "gru");
    let version = done["version"].as_i64().unwrap();
    assert_eq!(version, 2, "{done}");
    assert!(
        done["metrics"]["model"]["rmse"].as_f64().unwrap() > 0.0,
        "{done}"
    );
    assert!(
        done["metrics"]["naive"]["rmse"].as_f64().unwrap() > 0.0,
        "{done}"
    );

    // The forecast API serves the new version.
    let url = format!("http://{http}/ml/forecast?ticker=APIT&interval=15m&n_steps=3");
    let started = Instant::now();
    let body: Value = loop {
        let r = client.get(&url).send().await.unwrap();
        if r.status() == 200 {
            let b: Value = r.json().await.unwrap();
            if b["model"]["version"].as_i64() == Some(version) {
                break b;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "v{version} never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body["model"]["kind"], "gru");
    assert_eq!(body["forecasts"].as_array().unwrap().len(), 3);

    // The predictor's history follows aggregated_data: a revised last row is
    // picked up (the history is rebuilt), and so is a new row (appended).
    let cols = tickmesh_core::config::FeatureConfig::default().columns();
    let mut rows =
        a.db.read_aggregated("APIT", Interval::M15, &cols, None)
            .await
            .unwrap();
    let last = rows.last_mut().unwrap();
    let revised = last.values[3].unwrap() * 1.01;
    last.values[3] = Some(revised);
    last.values[1] = Some(last.values[1].unwrap().max(revised));
    let mut next = last.clone();
    a.db.load_aggregated("APIT", Interval::M15, &cols, &rows)
        .await
        .unwrap();
    let get = |url: String| {
        let c = client.clone();
        async move {
            c.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let b = get(url.clone()).await;
    assert_eq!(b["last_close"].as_f64(), Some(revised), "{b}");
    next.ts = tickmesh_model::forecast::next_timestamp(next.ts, Interval::M15);
    next.values[3] = Some(revised * 1.02);
    next.values[1] = Some(revised * 1.02);
    a.db.load_aggregated("APIT", Interval::M15, &cols, &[next.clone()])
        .await
        .unwrap();
    let b = get(url.clone()).await;
    assert_eq!(b["last_close"].as_f64(), Some(revised * 1.02), "{b}");
    assert_eq!(
        b["last_ts"]
            .as_str()
            .unwrap()
            .parse::<chrono::DateTime<chrono::Utc>>()
            .unwrap(),
        next.ts
    );

    // Bad parameters: 400 with a JSON error; an unknown ticker or job: 404.
    for q in [
        "interval=15m",
        "ticker=APIT&interval=7m",
        "ticker=APIT&epochs=0",
        "ticker=APIT&epochs=many",
        "ticker=APIT&model=transformer",
        "ticker=%C5%BFYNA",
        "ticker=APIT&color=red",
    ] {
        let (s, v) = post(q).await;
        assert_eq!(s, 400, "{q}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{q}: {v}"
        );
    }
    let (s, v) = post("ticker=ZZZZ&interval=15m").await;
    assert_eq!(s, 404, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("unknown ticker"),
        "{v}"
    );
    let r = client
        .get(format!("http://{http}/ml/train/no-such-job"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    node.stop().await;
}
