//! The serve role under load and change (docs/serving.md), on the embedded
//! backend (SQLite, a local object store), with real checkpoints of small
//! models trained here:
//!
//! - corrupted and truncated checkpoints are refused while the version
//!   before keeps serving, and the refusals show in `/ml/models` and
//!   `/metrics`;
//! - a load that fails for a passing reason is retried until it succeeds;
//! - injected panics (in the predictor actor, in a forecast) leave the
//!   ticker serving;
//! - past the limits requests get 429 / 503 with `Retry-After`; abandoned
//!   requests stop computing; concurrent requests share one computation;
//! - bad input gets a short, clear 400;
//! - the served version's one-step error on the bars stored after its
//!   training data (its live error, for the drift trigger) equals the
//!   model's predictions computed independently.

mod common;

use std::time::Duration;

use common::serving::*;
use tickmesh_core::config::Role;
use tickmesh_io::store::buckets;
use tickmesh_model::checkpoint::{self, Files};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_checkpoints_are_refused_and_the_old_version_keeps_serving() {
    let s = serve(&["TSTS"], |_| {}).await;
    let (_, good) = s.train("TSTS", 1).await;
    s.release("TSTS", 1, &good, &good.digest).await;
    s.wait_serving("TSTS", 1).await;

    // Forecasts go on while the bad versions arrive: every answer is v1's.
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (client, url) = (
        s.client.clone(),
        format!("{}/ml/forecast?ticker=TSTS&interval=15m&n_steps=5", s.http),
    );
    let load = tokio::spawn(async move {
        let mut answers = 0;
        while !*stop.borrow() {
            let r = client.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
            let b: serde_json::Value = r.json().await.unwrap();
            assert_eq!(b["model"]["version"], 1, "{b}");
            answers += 1;
        }
        answers
    });

    let prefix = |v: i64| format!("TSTS/15m/v{v}");
    // v2: the weights truncated after publication.
    let (_, f2) = s.train("TSTS", 2).await;
    checkpoint::publish(s.a.store.as_ref(), "TSTS", I, 2, &f2)
        .await
        .unwrap();
    s.a.store
        .put(
            buckets::MODELS,
            &format!("{}/model.safetensors", prefix(2)),
            f2.weights.slice(..f2.weights.len() / 2),
        )
        .await
        .unwrap();
    s.register("TSTS", 2, &f2.digest).await;
    // v3: meta.json garbled.
    let (_, f3) = s.train("TSTS", 3).await;
    checkpoint::publish(s.a.store.as_ref(), "TSTS", I, 3, &f3)
        .await
        .unwrap();
    s.a.store
        .put(
            buckets::MODELS,
            &format!("{}/meta.json", prefix(3)),
            bytes::Bytes::from_static(b"{\"kind\": \"lstm_attention\", \"tru"),
        )
        .await
        .unwrap();
    s.register("TSTS", 3, &f3.digest).await;
    // v4: consistent digests over truncated weights: only loading them finds out.
    let (mut m4, f4) = s.train("TSTS", 4).await;
    let cut = f4.weights.slice(..f4.weights.len() - 100).to_vec();
    m4.sha256 = tickmesh_io::store::sha256_hex(&cut);
    let f4 = Files::new(&m4, cut, &[]).unwrap();
    s.release("TSTS", 4, &f4, &f4.digest).await;

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let p = loop {
        let p = s.predictor("TSTS").await;
        if p["refused"].as_array().unwrap().len() == 3 {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "{p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop_tx.send(true).unwrap();
    let answers = load.await.unwrap();
    assert!(answers > 0);
    println!("{answers} forecasts, all from v1, while v2-v4 were refused");
    assert_eq!(p["state"], "serving");
    assert_eq!(p["version"], 1);
    let refused = p["refused"].as_array().unwrap();
    let reason = |v: i64| {
        refused
            .iter()
            .find(|r| r["version"] == v)
            .unwrap_or_else(|| panic!("v{v} not refused: {p}"))["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(
        reason(2).contains("model.safetensors does not match meta.json"),
        "{}",
        reason(2)
    );
    assert!(
        reason(3).contains("meta.json is not a valid checkpoint description"),
        "{}",
        reason(3)
    );
    assert!(
        reason(4).contains("model.safetensors does not fit"),
        "{}",
        reason(4)
    );
    assert_eq!(
        s.metric(
            "tickmesh_model_refusals_total",
            &[("ticker", "TSTS"), ("interval", "15m")]
        )
        .await,
        3.0
    );

    // A good version after the refusals is served.
    let (_, f5) = s.train("TSTS", 5).await;
    s.release("TSTS", 5, &f5, &f5.digest).await;
    s.wait_serving("TSTS", 5).await;
    // The node recorded what it served and refused, as model events.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let e =
            s.a.db
                .model_events(Some("TSTS"), Some(I), 100)
                .await
                .unwrap();
        if e.len() >= 5 || std::time::Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut seen: Vec<(i64, &str)> = events
        .iter()
        .map(|e| (e.version, e.kind.as_str()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (1, "served"),
            (2, "refused"),
            (3, "refused"),
            (4, "refused"),
            (5, "served")
        ]
    );
    assert!(events.iter().all(|e| e.node == "test-node"), "{events:?}");
    let b: serde_json::Value = s.forecast("TSTS", 3).await.json().await.unwrap();
    assert_eq!(b["model"]["version"], 5, "{b}");
    s.node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_fails_for_a_passing_reason_is_retried() {
    let s = serve(&["TSTR"], |c| {
        c.serve.load_retry_ms = 100;
        c.serve.load_retry_max_ms = 400;
    })
    .await;
    let (_, files) = s.train("TSTR", 1).await;
    // Announced before its files exist: the store says "not found".
    s.register("TSTR", 1, &files.digest).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let p = loop {
        let p = s.predictor("TSTR").await;
        if p["retry"]["attempts"].as_u64().unwrap_or(0) >= 2 {
            break p;
        }
        assert!(std::time::Instant::now() < deadline, "{p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(p["state"], "retrying", "{p}");
    assert_eq!(p["retry"]["version"], 1);
    assert!(
        p["retry"]["last_error"]
            .as_str()
            .unwrap()
            .contains("not found"),
        "{p}"
    );
    let r = s.forecast("TSTR", 3).await;
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("is not loaded: v1 failed"),
        "{e}"
    );
    assert_eq!(s.get("/readyz").await.status(), 503);

    checkpoint::publish(s.a.store.as_ref(), "TSTR", I, 1, &files)
        .await
        .unwrap();
    s.wait_serving("TSTR", 1).await;
    assert_eq!(s.forecast("TSTR", 3).await.status(), 200);
    assert_eq!(s.get("/readyz").await.status(), 200);
    let p = s.predictor("TSTR").await;
    assert!(p["retry"].is_null(), "{p}");
    s.node.stop().await;
}

/// A predictor that panics is restarted within its budget and serves; a
/// forecast that panics fails alone, and the next one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predictor_panic_leaves_the_ticker_serving() {
    // Only this test's ticker is affected (the failpoints name it).
    std::env::set_var("TICKMESH_FAILPOINT_PREDICTOR_PANIC", "TSTP:2");
    let s = serve(&["TSTP"], |_| {}).await;
    let (_, files) = s.train("TSTP", 1).await;
    s.release("TSTP", 1, &files, &files.digest).await;
    s.wait_serving("TSTP", 1).await;
    let p = s.predictor("TSTP").await;
    assert_eq!(p["restarts"], 2, "{p}");
    assert_eq!(
        s.metric(
            "tickmesh_supervisor_restarts_total",
            &[("supervisor", "serve"), ("child", "predictor TSTP 15m")]
        )
        .await,
        2.0
    );

    std::env::set_var("TICKMESH_FAILPOINT_FORECAST_PANIC", "TSTP:1");
    let r = s.forecast("TSTP", 5).await;
    assert_eq!(r.status(), 500);
    let e: serde_json::Value = r.json().await.unwrap();
    assert!(
        e["error"].as_str().unwrap().contains("injected panic"),
        "{e}"
    );
    for _ in 0..3 {
        assert_eq!(s.forecast("TSTP", 5).await.status(), 200);
    }
    s.node.stop().await;
}

/// Past `max_per_model` a request gets 429, past `max_queue` 503, both with
/// Retry-After; everything admitted is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_limits_get_429_and_503_with_retry_after() {
    let s = serve(&["TSTL", "TSTM"], |c| {
        c.serve.max_per_model = 4;
        c.serve.max_queue = 6;
        c.serve.compute_slots = 1;
        c.serve.coalesce = false;
    })
    .await;
    for (t, v) in [("TSTL", 1), ("TSTM", 1)] {
        let (_, f) = s.train(t, v).await;
        s.release(t, v, &f, &f.digest).await;
        s.wait_serving(t, v).await;
    }
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (client, url) = (
            s.client.clone(),
            format!(
                "{}/ml/forecast?ticker={}&interval=15m&n_steps=500",
                s.http,
                if i % 2 == 0 { "TSTL" } else { "TSTM" }
            ),
        );
        tasks.push(tokio::spawn(async move {
            let r = client.get(&url).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").cloned();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, retry, body)
        }));
    }
    let mut seen = std::collections::BTreeMap::<u16, usize>::new();
    for t in tasks {
        let (status, retry, body) = t.await.unwrap();
        *seen.entry(status).or_default() += 1;
        match status {
            200 => assert_eq!(body["forecasts"].as_array().unwrap().len(), 500),
            429 => {
                assert_eq!(retry.unwrap(), "1");
                assert!(
                    body["error"].as_str().unwrap().contains("max_per_model 4"),
                    "{body}"
                );
            }
            503 => {
                assert_eq!(retry.unwrap(), "1");
                assert!(
                    body["error"].as_str().unwrap().contains("max_queue 6"),
                    "{body}"
                );
            }
            other => panic!("{other}: {body}"),
        }
    }
    println!("statuses: {seen:?}");
    assert!(seen.get(&200).copied().unwrap_or(0) >= 2, "{seen:?}");
    assert!(seen.get(&429).copied().unwrap_or(0) + seen.get(&503).copied().unwrap_or(0) > 0);
    assert_eq!(
        seen.values().sum::<usize>(),
        24,
        "every request is answered: {seen:?}"
    );
    s.node.stop().await;
}

/// Requests whose clients went away stop computing: far fewer steps are
/// computed than were asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_stop_computing() {
    let s = serve(&["TSTA"], |c| {
        c.serve.compute_slots = 1;
        c.serve.coalesce = false;
    })
    .await;
    let (_, f) = s.train("TSTA", 1).await;
    s.release("TSTA", 1, &f, &f.digest).await;
    s.wait_serving("TSTA", 1).await;
    assert_eq!(s.forecast("TSTA", 1).await.status(), 200);
    let steps = || s.metric("tickmesh_forecast_steps_total", &[("ticker", "TSTA")]);
    let before = steps().await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(30))
        .build()
        .unwrap();
    let asked = 40 * 500;
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (c, url) = (
            impatient.clone(),
            format!(
                "{}/ml/forecast?ticker=TSTA&interval=15m&n_steps=500",
                s.http
            ),
        );
        tasks.push(tokio::spawn(
            async move { c.get(&url).send().await.is_err() },
        ));
    }
    let mut dropped = 0;
    for t in tasks {
        dropped += t.await.unwrap() as usize;
    }
    assert!(dropped > 0, "no request gave up");
    // Let whatever still runs notice and stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = steps().await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = steps().await;
        if now == last {
            break;
        }
        last = now;
        assert!(std::time::Instant::now() < deadline);
    }
    let computed = last - before;
    println!("{dropped} requests gave up; {computed} of {asked} steps computed");
    assert!(
        computed < (asked / 4) as f64,
        "{computed} of {asked} steps computed for requests that went away"
    );
    assert!(s.metric("tickmesh_forecast_cancelled_total", &[]).await > 0.0);
    assert_eq!(s.forecast("TSTA", 5).await.status(), 200);
    s.node.stop().await;
}

/// Concurrent requests for the same model and data share one computation,
/// and every one gets the same answer, a prefix of the longest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_computation() {
    let s = serve(&["TSTC"], |_| {}).await;
    let (_, f) = s.train("TSTC", 1).await;
    s.release("TSTC", 1, &f, &f.digest).await;
    s.wait_serving("TSTC", 1).await;
    let steps = || s.metric("tickmesh_forecast_steps_total", &[("ticker", "TSTC")]);
    let before = steps().await;
    let mut tasks = Vec::new();
    for i in 0..32 {
        let n = if i % 2 == 0 { 200 } else { 50 };
        let (c, url) = (
            s.client.clone(),
            format!(
                "{}/ml/forecast?ticker=TSTC&interval=15m&n_steps={n}",
                s.http
            ),
        );
        tasks.push(tokio::spawn(async move {
            let b: serde_json::Value = c.get(&url).send().await.unwrap().json().await.unwrap();
            b["forecasts"].as_array().unwrap().clone()
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let longest = answers.iter().max_by_key(|a| a.len()).unwrap().clone();
    assert_eq!(longest.len(), 200);
    for a in &answers {
        assert_eq!(a[..], longest[..a.len()]);
    }
    let computed = steps().await - before;
    println!("32 requests, {computed} steps computed");
    // One trajectory of 200 steps, or a few when the first finished
    // before later requests arrived with newer data: never one per request.
    assert!(computed <= 400.0, "{computed} steps for 32 shared requests");
    s.node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_short_clear_400() {
    let s = serve(&["TSTB"], |_| {}).await;
    let (_, f) = s.train("TSTB", 1).await;
    s.release("TSTB", 1, &f, &f.digest).await;
    s.wait_serving("TSTB", 1).await;
    assert_eq!(
        s.forecast("tstb", 2).await.status(),
        200,
        "lower case is fine"
    );
    let huge = "A".repeat(10_000);
    for (query, says) in [
        (
            "ticker=%C5%BFtstb&interval=15m".to_string(),
            "must be 1-12 characters",
        ),
        (
            format!("ticker={huge}&interval=15m"),
            "must be 1-12 characters",
        ),
        (
            format!("ticker=TSTB&interval=15m&n_steps={huge}"),
            "is not a whole number",
        ),
        (format!("ticker=TSTB&interval={huge}"), "is not one of"),
        (format!("ticker=TSTB&{huge}=1"), "unknown query parameter"),
        (
            "ticker=TSTB&interval=15m&n_steps=100000".to_string(),
            "must be in 1..=",
        ),
    ] {
        let r = s.get(&format!("/ml/forecast?{query}")).await;
        assert_eq!(r.status(), 400, "{}", &query[..query.len().min(60)]);
        let body = r.text().await.unwrap();
        assert!(body.len() < 300, "a {} byte error body", body.len());
        assert!(body.contains(says), "{body}");
    }
    let r = s.get("/ml/forecast?ticker=NOPE&interval=15m").await;
    assert_eq!(r.status(), 404);
    // Every forecast metric has its HELP and TYPE lines; latency is a histogram.
    let text = s.get("/metrics").await.text().await.unwrap();
    for (name, kind) in [
        ("tickmesh_forecast_requests_total", "counter"),
        ("tickmesh_forecast_request_seconds", "histogram"),
        ("tickmesh_forecast_compute_seconds", "histogram"),
        ("tickmesh_forecast_steps_total", "counter"),
        ("tickmesh_model_loads_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "no TYPE {kind} for {name}"
        );
    }
    assert!(
        text.contains("tickmesh_forecast_request_seconds_bucket{"),
        "latency buckets"
    );
    s.node.stop().await;
}

/// Latencies and statuses of forecasts sent by `clients` loops for `secs`.
async fn load(s: &Serve, ticker: &str, clients: usize, secs: u64) -> Vec<(Duration, u16, i64)> {
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (c, url) = (
            s.client.clone(),
            format!(
                "{}/ml/forecast?ticker={ticker}&interval=15m&n_steps=10",
                s.http
            ),
        );
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while std::time::Instant::now() < until {
                let t = std::time::Instant::now();
                let r = c.get(&url).send().await.unwrap();
                let status = r.status().as_u16();
                let b: serde_json::Value = r.json().await.unwrap_or_default();
                out.push((
                    t.elapsed(),
                    status,
                    b["model"]["version"].as_i64().unwrap_or(0),
                ));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn p99(samples: &[(Duration, u16, i64)]) -> Duration {
    let mut l: Vec<Duration> = samples.iter().map(|s| s.0).collect();
    l.sort();
    l[(l.len() * 99 / 100).min(l.len() - 1)]
}

/// Swap under load: 20 promotions through the Admin API (alternating two
/// versions) while 8 clients send forecasts for 60 s. No request fails, and
/// the p99 latency during the swaps stays under twice the p99 of the same
/// load without swaps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_promotions_under_load_fail_no_request() {
    use tickmesh_proto::v1::PromoteRequest;
    let s = serve_roles(&["TSTW"], &[Role::Coordinator, Role::Serve], |_| {}).await;
    let (_, f1) = s.train("TSTW", 1).await;
    let (_, f2) = s.train("TSTW", 2).await;
    for (v, f) in [(1, &f1), (2, &f2)] {
        checkpoint::publish(s.a.store.as_ref(), "TSTW", I, v, f)
            .await
            .unwrap();
    }
    s.record("TSTW", 1, &f1.digest, "retired").await;
    s.record("TSTW", 2, &f2.digest, "retired").await;
    let token = tickmesh::roles::client_admin_token(&s.cfg).unwrap();
    let addr = s.node.bound.coordinator.unwrap().to_string();
    let admin = tickmesh::roles::coordinator_link(&s.cfg, &addr, Some(&token))
        .unwrap()
        .admin()
        .unwrap();
    let promote = move |v: i64| {
        let mut admin = admin.clone();
        async move {
            admin
                .promote(PromoteRequest {
                    ticker: "TSTW".into(),
                    interval: "15m".into(),
                    version: v,
                })
                .await
                .unwrap();
        }
    };
    promote(1).await;
    s.wait_serving("TSTW", 1).await;

    let quiet = load(&s, "TSTW", 8, 20).await;
    let swaps = {
        let promote = promote.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                tokio::time::sleep(Duration::from_millis(2_900)).await;
                promote(if i % 2 == 0 { 2 } else { 1 }).await;
            }
        })
    };
    let busy = load(&s, "TSTW", 8, 60).await;
    swaps.await.unwrap();
    let failed = |v: &[(Duration, u16, i64)]| v.iter().filter(|s| s.1 != 200).count();
    let versions: std::collections::BTreeSet<i64> = busy.iter().map(|s| s.2).collect();
    let (pq, pb) = (p99(&quiet), p99(&busy));
    println!(
        "without swaps: {} requests, p99 {pq:?}; with 20 promotions: {} requests, p99 {pb:?}, versions served {versions:?}",
        quiet.len(),
        busy.len()
    );
    assert_eq!(failed(&quiet), 0);
    assert_eq!(failed(&busy), 0, "requests failed during the swaps");
    assert_eq!(
        versions,
        [1, 2].into(),
        "both versions served during the swaps"
    );
    assert!(pb < pq * 2, "p99 {pb:?} during swaps, {pq:?} without");
    // The last promotion (of v1) is what serves.
    s.wait_serving("TSTW", 1).await;
    s.node.stop().await;
}

/// The predictor scores the served version on the stored bars after its
/// training data and records the live error: equal to the one-step errors
/// computed here from the same checkpoint and rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_error_is_the_one_step_error_on_the_bars_after_the_training_data() {
    let s = serve(&["TSTV"], |c| {
        c.retrain.poll_secs = 1;
        c.retrain.drift_bars = 12;
    })
    .await;
    // Trained on the rows up to 2024-04-10: the last two days are live.
    let until: chrono::DateTime<chrono::Utc> = "2024-04-10T20:00:00Z".parse().unwrap();
    let (meta, f) = s.train_until("TSTV", 1, Some(until)).await;
    assert!(meta.data.to <= until);
    s.release("TSTV", 1, &f, &f.digest).await;
    s.wait_serving("TSTV", 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let recorded = loop {
        if let Some(l) = s.a.db.live_error("TSTV", I, 1).await.unwrap() {
            break l;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no live error recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Independently: every stored row, the same checkpoint, a history per bar.
    let columns = s.cfg.features.columns();
    let rows =
        s.a.db
            .read_aggregated("TSTV", I, &columns, None)
            .await
            .unwrap();
    let fc = tickmesh_model::forecast::Forecaster::load(meta.clone(), &f.weights).unwrap();
    let live: Vec<usize> = (0..rows.len())
        .filter(|&k| rows[k].ts > meta.data.to)
        .collect();
    let scored = &live[live.len().saturating_sub(12)..];
    assert_eq!(scored.len(), 12, "two live days of 15-minute bars");
    let mut sq = 0.0;
    let mut scratch = tickmesh_model::native::Scratch::default();
    for &k in scored {
        let h = fc.history_of(&rows[..k]).unwrap();
        let p = fc.next_close(&h, &mut scratch).unwrap();
        let actual = tickmesh_features::Ohlcv::of_row(&rows[k].values).unwrap().c;
        sq += (p - actual).powi(2);
    }
    let rmse = (sq / 12.0).sqrt();
    println!(
        "live rmse {} (recorded {}), test rmse {}",
        rmse, recorded.rmse, meta.metrics.model.rmse
    );
    assert_eq!(recorded.bars, 12);
    assert_eq!(recorded.through, rows[*scored.last().unwrap()].ts);
    assert!(
        (recorded.rmse - rmse).abs() <= 1e-12 * rmse,
        "recorded {} against {rmse}",
        recorded.rmse
    );
    let p = s.predictor("TSTV").await;
    assert_eq!(p["live"]["bars"], 12, "{p}");
    assert!(
        s.metric("tickmesh_model_live_rmse", &[("ticker", "TSTV")])
            .await
            > 0.0,
        "the live RMSE on /metrics"
    );
    s.node.stop().await;
}
