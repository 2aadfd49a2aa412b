//! Bad configuration gets a clear error naming the key and the file.

use std::process::Command;

fn tickmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tickmesh"))
}

/// Runs `tickmesh config check FILE` with extra environment; returns
/// (success, stdout, stderr).
fn config_check(file: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = tickmesh()
        .args(["config", "check"])
        .arg(file)
        .env_remove("TICKMESH_COOKIE")
        .env_remove("TICKMESH_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_check_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("cluster.toml");
    std::fs::write(&bad, "[postgres]\nport = \"fifteen\"\n").unwrap();
    let (ok, _, err) = config_check(&bad, &[]);
    assert!(!ok);
    assert!(
        err.contains("`postgres.port`") && err.contains("cluster.toml"),
        "{err}"
    );

    std::fs::write(&bad, "[serve]\nhttp_listen = \"localhost\"\n").unwrap();
    let (ok, _, err) = config_check(&bad, &[]);
    assert!(!ok);
    assert!(err.contains("`serve.http_listen`"));

    let (_, _, err) = config_check(&bad, &[("POSTGRES_PORT", "not-a-port")]);
    assert!(err.contains("POSTGRES_PORT"));

    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster.toml");
    // Distributed mode has no default cookie.
    let (ok, _, err) = config_check(&good, &[]);
    assert!(!ok);
    assert!(
        err.contains("`cluster.cookie`") && err.contains("TICKMESH_COOKIE"),
        "{err}"
    );
    let (ok, out, err) = config_check(&good, &[("TICKMESH_COOKIE", "a-long-shared-secret")]);
    assert!(ok, "{err}");
    assert!(out.contains("ok (distributed backend, 4 nodes"));
}

#[test]
fn a_distributed_coordinator_does_not_start_without_an_admin_token() {
    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster.toml");
    let out = tickmesh()
        .args(["run", "--node", "coordinator", "--config"])
        .arg(&good)
        .env_remove("TICKMESH_ADMIN_TOKEN")
        .env("TICKMESH_COOKIE", "a-long-shared-secret")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no admin token") && err.contains("TICKMESH_ADMIN_TOKEN"),
        "{err}"
    );
    // A blank or short token is no token.
    let out = tickmesh()
        .args(["run", "--node", "coordinator", "--config"])
        .arg(&good)
        .env("TICKMESH_ADMIN_TOKEN", "  short  ")
        .env("TICKMESH_COOKIE", "a-long-shared-secret")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("TICKMESH_ADMIN_TOKEN") && err.contains("at least 16"),
        "{err}"
    );
}
