//! Process-level: two `tickmesh run` nodes form a ractor_cluster mesh and
//! `tickmesh admin mesh` lists both through the seed (the replies cross
//! processes bincode-encoded); with a wrong cookie it fails instead of
//! listing an empty mesh.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tickmesh() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tickmesh"))
}

/// Ports of the two-node cluster: coordinator gRPC, HTTP, and the two
/// nodes' cluster ports.
struct Ports {
    grpc: u16,
    http: u16,
    c1: u16,
    c2: u16,
}

impl Ports {
    fn free() -> Self {
        Ports {
            grpc: free_port(),
            http: free_port(),
            c1: free_port(),
            c2: free_port(),
        }
    }
}

/// cluster.toml of a coordinator node and a predictor node on the mesh,
/// with `extra` lines in `[cluster]`.
fn two_node_config(
    name: &str,
    cookie: &str,
    extra: &str,
    data: &std::path::Path,
    p: &Ports,
) -> String {
    format!(
        r#"
[cluster]
name = "{name}"
backend = "embedded"
cookie = "{cookie}"
{extra}

[embedded]
data_dir = "{data}"

[coordinator]
listen = "127.0.0.1:{grpc}"

[serve]
http_listen = "127.0.0.1:{http}"

[[nodes]]
name = "coord"
roles = ["coordinator", "aggregate"]
cluster_port = {c1}

[[nodes]]
name = "predictor"
roles = ["serve"]
cluster_port = {c2}
"#,
        data = data.display(),
        grpc = p.grpc,
        http = p.http,
        c1 = p.c1,
        c2 = p.c2,
    )
}

/// Starts `node` of `config`, killed when dropped.
fn run_node(config: &std::path::Path, node: &str) -> Killed {
    Killed(
        tickmesh()
            .args(["run", "--node", node, "--config"])
            .arg(config)
            .env_remove("TICKMESH_COOKIE")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn two_nodes_form_a_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let (grpc, http, c1) = (ports.grpc, ports.http, ports.c1);
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        two_node_config(
            "mesh-test",
            "secret-mesh-cookie",
            "",
            &dir.path().join("data"),
            &ports,
        ),
    )
    .unwrap();
    let run = |node: &str| run_node(&config, node);
    let _coord = run("coord");
    let _pred = run("predictor");

    let start = Instant::now();
    loop {
        let (ok, stdout, stderr) = admin_mesh(&config, &[]);
        if ok && stdout.contains("2 nodes") {
            assert!(
                stdout.contains("coord ") && stdout.contains("coordinator,aggregate"),
                "{stdout}"
            );
            assert!(stdout.contains(&format!("127.0.0.1:{grpc}")), "{stdout}");
            assert!(
                stdout.contains("predictor") && stdout.contains(&format!("127.0.0.1:{http}")),
                "{stdout}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the mesh never showed both nodes: {stdout} {stderr}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // A wrong cookie: the seed refuses the handshake, and the command says so.
    let (ok, _, stderr) = admin_mesh(&config, &[("TICKMESH_COOKIE", "not-the-cluster-cookie")]);
    assert!(!ok, "a wrong cookie must fail: {stderr}");
    assert!(stderr.contains("cookie"), "{stderr}");

    // A connection that never authenticates is closed by the handshake timeout.
    use std::io::Read;
    let mut stranger = std::net::TcpStream::connect(("127.0.0.1", c1)).unwrap();
    stranger
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let opened = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match stranger.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the silent connection was not closed: {e} after {:?}",
                opened.elapsed()
            ),
        }
    }
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "closed after {took:?}; the handshake timeout is 10 s"
    );
}

/// `tickmesh admin mesh` with `config` (and `env`): (success, stdout, stderr).
fn admin_mesh(config: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = tickmesh()
        .args([
            "admin",
            "mesh",
            "--port",
            &free_port().to_string(),
            "--config",
        ])
        .arg(config)
        .env_remove("TICKMESH_COOKIE")
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
fn a_tls_mesh_forms_over_tls_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    common::make_certs(&certs);
    let ports = Ports::free();
    let body = |tls: bool| {
        let tls = if tls {
            format!(
                "tls_cert_file = \"{0}/server.pem\"\ntls_key_file = \"{0}/server.key\"\ntls_ca_file = \"{0}/ca.pem\"",
                certs.display()
            )
        } else {
            String::new()
        };
        two_node_config(
            "tls-mesh-test",
            "tls-mesh-test-cookie",
            &tls,
            &dir.path().join("data"),
            &ports,
        )
    };
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, body(true)).unwrap();
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, body(false)).unwrap();
    let run = |node: &str| run_node(&config, node);
    let _coord = run("coord");
    let _pred = run("predictor");
    let start = Instant::now();
    loop {
        let (ok, stdout, stderr) = admin_mesh(&config, &[]);
        if ok && stdout.contains("2 nodes") {
            assert!(
                stdout.contains("coord ") && stdout.contains("predictor"),
                "{stdout}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the TLS mesh never showed both nodes: {stdout} {stderr}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Plaintext to the TLS mesh: no node answers.
    let (ok, stdout, stderr) = admin_mesh(&plain, &[]);
    assert!(!ok, "plaintext joined a TLS mesh: {stdout}");
    assert!(!stdout.contains("2 nodes"), "{stdout} {stderr}");
}
