//! tickmesh-testkit: a dev-dependency only.
//!
//! How integration tests reach the real services that `scripts/services.sh`
//! starts on 127.0.0.1. Every helper fails (never skips) with a message
//! naming that script when its server does not answer. Each call isolates
//! the test: its own topic prefix, bucket prefix and PostgreSQL database.

use std::collections::HashMap;
use std::net::TcpStream;
use std::time::Duration;

use tickmesh_core::config::{Backend, ClusterConfig};

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

/// Panics, naming the script, unless `addr` accepts TCP connections.
pub fn require_server(what: &str, addr: &str) {
    let ok = addr
        .parse()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_secs(3)).ok())
        .is_some();
    assert!(
        ok,
        "{what} is not reachable at {addr}: start the test services with `scripts/services.sh up` \
         (scripts/test.sh does this for the whole suite)"
    );
}

/// A short unique name for this test's resources.
pub fn unique(label: &str) -> String {
    format!("{label}{:08x}", rand::random::<u32>())
}

/// A distributed-mode config pointing at the test services, with unique
/// prefixes. Topics, buckets and the database are created.
pub async fn distributed_config(label: &str) -> ClusterConfig {
    let mut cfg =
        ClusterConfig::parse("", "test", &HashMap::new()).expect("default config is valid");
    cfg.cluster.backend = Backend::Distributed;
    // Distributed mode has no default secrets.
    cfg.cluster.cookie = Some(format!("{label}-cookie-for-tests"));
    cfg.admin.token_env = Some(format!("{label}-admin-token-for-tests"));
    cfg.kafka.brokers = env_or("TICKMESH_TEST_KAFKA", "127.0.0.1:19092");
    cfg.s3.endpoint_url = env_or("TICKMESH_TEST_S3", "http://127.0.0.1:19000");
    cfg.postgres.port = env_or("TICKMESH_TEST_PG_PORT", "15432")
        .parse()
        .expect("port");
    require_server("the Kafka broker (tansu)", &cfg.kafka.brokers);
    require_server(
        "the S3 server (s3s-fs)",
        cfg.s3.endpoint_url.trim_start_matches("http://"),
    );
    require_server(
        "PostgreSQL",
        &format!("{}:{}", cfg.postgres.host, cfg.postgres.port),
    );

    let id = unique(label).to_lowercase();
    cfg.kafka.topic_prefix = format!("{id}-");
    cfg.kafka.group_id = id.clone();
    cfg.s3.bucket_prefix = format!("{id}-");
    cfg.postgres.db = id.replace('-', "_");

    tickmesh_io::bus::kafka_create_topics(
        &cfg.kafka.brokers,
        &cfg.kafka.topic_prefix,
        tickmesh_core::types::topics::ALL,
        1,
    )
    .await
    .expect("create test topics");
    tickmesh_io::store::S3Store::new(&cfg.s3)
        .create_buckets()
        .await
        .expect("create test buckets");
    let mut admin = cfg.postgres.clone();
    admin.db = "postgres".into();
    let pool = sqlx::PgPool::connect(&admin.url())
        .await
        .expect("connect to PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {}", cfg.postgres.db))
        .execute(&pool)
        .await
        .expect("create test database");
    pool.close().await;
    cfg
}

/// An embedded-mode config rooted at `dir`.
pub fn embedded_config(dir: &std::path::Path) -> ClusterConfig {
    let mut cfg =
        ClusterConfig::parse("", "test", &HashMap::new()).expect("default config is valid");
    cfg.cluster.backend = Backend::Embedded;
    cfg.embedded.data_dir = dir.to_path_buf();
    cfg
}
