//! Bad configuration gets a clear error naming the key and the file.

use std::process::Command;

fn tickmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tickmesh"))
}

#[test]
fn config_check_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("cluster.toml");
    std::fs::write(&bad, "[postgres]\nport = \"fifteen\"\n").unwrap();
    let out = tickmesh()
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`postgres.port`") && err.contains("cluster.toml"),
        "{err}"
    );

    std::fs::write(&bad, "[serve]\nhttp_listen = \"localhost\"\n").unwrap();
    let out = tickmesh()
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`serve.http_listen`"));

    let out = tickmesh()
        .args(["config", "check"])
        .arg(&bad)
        .env("POSTGRES_PORT", "not-a-port")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("POSTGRES_PORT"));

    let good = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster.toml");
    let out = tickmesh()
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (distributed backend, 4 nodes"));
}
