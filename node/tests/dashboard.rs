//! The dashboard in headless Chromium (Debian's, driven by Playwright:
//! `scripts/py/dashboard_check.py`) against a real serve node with a
//! coordinator, on the embedded backend: the page loads with no console
//! error, draws a chart per served model and the model table (with a version
//! the promotion gate rejected), and updates without a reload when a version
//! is promoted through the Admin API. The test saves a screenshot
//! (`docs/dashboard.png` is one).

mod common;

use std::process::Command;

use common::serving::*;
use common::*;
use tickmesh_core::config::Role;
use tickmesh_model::checkpoint;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_models_and_follows_a_promotion() {
    let py = python_with("playwright.sync_api");
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is missing: run scripts/setup.sh"
    );
    let s = serve_roles(&["TSTD", "TSTE"], &[Role::Coordinator, Role::Serve], |_| {}).await;
    // TSTD: v1 serves, v2 waits to be promoted, v3 was rejected by the gate.
    let mut digests = Vec::new();
    for v in 1..=3 {
        let (_, f) = s.train("TSTD", v).await;
        checkpoint::publish(s.a.store.as_ref(), "TSTD", I, v, &f)
            .await
            .unwrap();
        digests.push(f.digest);
    }
    s.record("TSTD", 2, &digests[1], "retired").await;
    s.record_metrics(
        "TSTD",
        3,
        &digests[2],
        "rejected",
        r#"{"gate":{"promoted":false,"reason":"does not beat naive on its test window: rmse 1.010000, naive 1.000000","metric":"rmse","margin":0.0}}"#,
    )
    .await;
    s.register("TSTD", 1, &digests[0]).await;
    let (_, e1) = s.train("TSTE", 1).await;
    s.release("TSTE", 1, &e1, &e1.digest).await;
    s.wait_serving("TSTD", 1).await;
    s.wait_serving("TSTE", 1).await;

    let token = tickmesh::roles::client_admin_token(&s.cfg).unwrap();
    let shot = std::env::temp_dir().join("tickmesh-dashboard.png");
    let out = Command::new(&py)
        .arg(repo().join("scripts/py/dashboard_check.py"))
        .args(["--url", &s.http, "--token", &token])
        .args(["--ticker", "TSTD", "--interval", "15m", "--promote", "2"])
        .arg("--screenshot")
        .arg(&shot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "dashboard check failed: {stdout}\n{stderr}"
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["console_errors"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["before"]["chart_version"], "1", "{seen}");
    assert_eq!(
        seen["before"]["charts"], 2,
        "one chart per served model: {seen}"
    );
    assert!(
        seen["banner"]
            .as_str()
            .unwrap()
            .contains("now serving v2 (was v1)"),
        "{seen}"
    );
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    println!("screenshot: {} ({} bytes)", shot.display(), png.len());
    s.node.stop().await;
}
