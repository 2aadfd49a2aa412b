//! Partition ownership moves between ingest nodes while they ingest, on the
//! real broker, S3 server and PostgreSQL (`scripts/services.sh up`).
//!
//! `h_alpaca` has 6 partitions here. Two producers send about 390,000
//! 1-minute bars for 8 tickers over ~30 s: confluent-kafka with its default
//! batching (one message per ticker-day) and tickmesh's own publisher (one
//! per ticker-week). Meanwhile, with real `tickmesh run` processes:
//!
//! 1. `ingest-a` starts alone and takes all 6 partition leases;
//! 2. `ingest-b` joins: the leases split 3/3 and `ingest-b` commits on its
//!    partitions;
//! 3. `ingest-b` leaves cleanly (SIGTERM): `ingest-a` owns all 6 again, at
//!    once, since `ingest-b` gave its leases back;
//! 4. `ingest-b` joins again, commits, and dies (SIGKILL): its partitions
//!    move back to `ingest-a` once its leases expire (`lease_secs = 3`).
//!
//! Each handover is read from the lease table, and progress from the
//! offsets committed on the broker. At the end every partition's committed
//! offset equals its high watermark, and pyarrow reads every object back
//! through the S3 protocol: the (ticker, timestamp) rows equal what was
//! produced, 0 missing and 0 duplicates.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::{topics, BarsMessage};
use tickmesh_ingest::producer::weekly_messages;
use tickmesh_io::bus::{kafka_create_topics, KafkaPublisher, KafkaSubscription, Publisher, Share};
use tickmesh_io::db::Db;

const PARTITIONS: i32 = 6;

/// A node process, killed when the test ends however it ends (a failed
/// assertion must not leave it consuming).
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(
    config: &std::path::Path,
    dir: &std::path::Path,
    node: &str,
    n: usize,
) -> (Proc, std::path::PathBuf) {
    let log = dir.join(format!("{node}-{n}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_tickmesh"))
        .args(["run", "--node", node, "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (Proc(child), log)
}

/// `GET /metrics` of a node, over a plain socket.
fn get_metrics(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}

/// Who holds a live lease of each partition.
async fn owners(db: &Db, group: &str, topic: &str) -> BTreeMap<i32, String> {
    db.ingest_leases(group, topic)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.expires_in_ms > 0)
        .map(|l| (l.partition, l.owner))
        .collect()
}

/// Waits until `want` holds of the owners; returns how long it took.
async fn until_owners(
    db: &Db,
    group: &str,
    topic: &str,
    what: &str,
    logs: &[&std::path::Path],
    want: impl Fn(&BTreeMap<i32, String>) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let o = owners(db, group, topic).await;
        if want(&o) {
            return start.elapsed();
        }
        if start.elapsed() > Duration::from_secs(60) {
            let tails: Vec<String> = logs.iter().map(|l| common::tail(l)).collect();
            panic!(
                "{what}: not within 60 s; owners {o:?}\n{}",
                tails.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn held_by(o: &BTreeMap<i32, String>, node: &str) -> BTreeSet<i32> {
    o.iter()
        .filter(|(_, n)| *n == node)
        .map(|(p, _)| *p)
        .collect()
}

/// Waits until the committed offset of one of `parts` moves past `before`.
async fn until_progress(
    offsets: &KafkaSubscription,
    parts: &BTreeSet<i32>,
    what: &str,
    log: &std::path::Path,
) {
    let before = offsets.committed_offsets().await.unwrap();
    let high = offsets.high_watermarks().await.unwrap();
    if parts
        .iter()
        .all(|p| before.get(p).copied().unwrap_or(0) >= high[p])
    {
        eprintln!("{what}: {parts:?} already committed to their ends");
        return;
    }
    let start = Instant::now();
    loop {
        let now = offsets.committed_offsets().await.unwrap();
        if parts
            .iter()
            .any(|p| now.get(p).copied().unwrap_or(0) > before.get(p).copied().unwrap_or(0))
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: nothing committed on {parts:?} within 60 s:\n{}",
            common::tail(log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_when_a_second_consumer_joins_leaves_and_dies_with_nothing_lost() {
    let py = common::python_with("confluent_kafka, pyarrow");
    let (mut cfg, a) = common::distributed("rebal").await;
    // The test topics with 6 partitions, under a prefix of their own.
    cfg.kafka.topic_prefix = format!("{}p6-", cfg.kafka.topic_prefix);
    kafka_create_topics(
        &cfg.kafka.brokers,
        &cfg.kafka.topic_prefix,
        topics::ALL,
        PARTITIONS,
    )
    .await
    .expect("create the 6-partition topics");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &config,
        format!(
            r#"{services}[ingest]
batch_records = 20
lease_secs = 3
[[nodes]]
name = "ingest-a"
roles = ["ingest"]
metrics_listen = "127.0.0.1:{metrics_port}"
[[nodes]]
name = "ingest-b"
roles = ["ingest"]
"#,
            services = common::services_toml(&cfg, "rebal"),
        ),
    )
    .unwrap();

    // The data: 8 tickers, 2024-01-02 .. 2024-06-28.
    let (from, to) = ("2024-01-02".parse().unwrap(), "2024-06-28".parse().unwrap());
    let mut expected = BTreeSet::new();
    let mut python_lines = String::new();
    let mut ours: Vec<BarsMessage> = Vec::new();
    for i in 0..8 {
        let t = format!("REBL{i}");
        let bars = SyntheticMarket.bars(&t, from, to);
        expected.extend(bars.iter().map(|b| (t.clone(), b.t.timestamp_micros())));
        if i < 4 {
            python_lines.push_str(&common::daily_tsv_lines(&t, &bars));
        } else {
            ours.extend(weekly_messages(&t, &bars));
        }
    }
    let lines = dir.path().join("python.tsv");
    std::fs::write(&lines, &python_lines).unwrap();
    let python_msgs = python_lines.lines().count();
    eprintln!(
        "{} bars in {} messages ({python_msgs} batched by confluent-kafka, {} ours) over {PARTITIONS} partitions",
        expected.len(),
        python_msgs + ours.len(),
        ours.len()
    );

    let group = format!("{}-ingest", cfg.kafka.group_id);
    let topic = format!("{}{}", cfg.kafka.topic_prefix, topics::BARS);
    let db = &a.db;
    let offsets = KafkaSubscription::new(
        &cfg.kafka.brokers,
        &cfg.kafka.topic_prefix,
        &group,
        topics::BARS,
        Share::ALL,
    )
    .await
    .unwrap();

    // 1. ingest-a alone takes every partition.
    let (mut node_a, log_a) = spawn(&config, dir.path(), "ingest-a", 0);
    let t = until_owners(db, &group, &topic, "ingest-a takes all 6", &[&log_a], |o| {
        held_by(o, "ingest-a").len() == PARTITIONS as usize
    })
    .await;
    eprintln!(
        "ingest-a took all {PARTITIONS} partitions {:.2} s after it was found ready",
        t.as_secs_f64()
    );

    // The producers, for about 30 s.
    let rate = (python_msgs as f64 / 30.0).to_string();
    let py_producer = Command::new(&py)
        .arg(common::repo().join("scripts/py/kafka_produce.py"))
        .args([cfg.kafka.brokers.as_str(), topic.as_str()])
        .arg(&lines)
        .args(["--rate", &rate, "--burst", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let publisher = KafkaPublisher::new(&cfg.kafka.brokers, &cfg.kafka.topic_prefix).unwrap();
    let n_ours = ours.len();
    let ours_task = tokio::spawn(async move {
        let gap = Duration::from_secs_f64(30.0 / n_ours as f64);
        for m in &ours {
            let payload = serde_json::to_vec(m).unwrap();
            publisher
                .publish(topics::BARS, &m.ticker, &payload, &[])
                .await
                .unwrap();
            tokio::time::sleep(gap).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;

    let split = |o: &BTreeMap<i32, String>| {
        held_by(o, "ingest-a").len() == 3 && held_by(o, "ingest-b").len() == 3
    };
    let mut handovers = Vec::new();
    for round in 0..2 {
        // 2. / 4. ingest-b joins: the leases split 3/3 and it makes progress.
        let (mut node_b, log_b) = spawn(&config, dir.path(), "ingest-b", round);
        let t = until_owners(
            db,
            &group,
            &topic,
            "ingest-b joins",
            &[&log_a, &log_b],
            split,
        )
        .await;
        eprintln!(
            "round {round}: ingest-b joined; the leases split 3/3 in {:.2} s",
            t.as_secs_f64()
        );
        let b_parts = held_by(&owners(db, &group, &topic).await, "ingest-b");
        until_progress(&offsets, &b_parts, "ingest-b after joining", &log_b).await;
        let a_parts = held_by(&owners(db, &group, &topic).await, "ingest-a");
        until_progress(&offsets, &a_parts, "ingest-a beside ingest-b", &log_a).await;

        // 3. a clean leave, then 4. a death.
        let how = if round == 0 { "SIGTERM" } else { "SIGKILL" };
        let sig = if round == 0 { "-TERM" } else { "-KILL" };
        let gone = Command::new("kill")
            .args([sig, &node_b.id().to_string()])
            .status()
            .unwrap();
        assert!(gone.success());
        let t = until_owners(
            db,
            &group,
            &topic,
            &format!("ingest-a takes over after {how}"),
            &[&log_a, &log_b],
            |o| held_by(o, "ingest-a").len() == PARTITIONS as usize,
        )
        .await;
        let status = node_b.wait().unwrap();
        eprintln!("round {round}: after {how} of ingest-b ({status}), ingest-a held all {PARTITIONS} again in {:.2} s", t.as_secs_f64());
        if round == 0 {
            assert!(
                status.success(),
                "ingest-b did not stop cleanly on SIGTERM: {status}\n{}",
                common::tail(&log_b)
            );
            let log = std::fs::read_to_string(&log_b).unwrap();
            assert!(
                log.contains("left the partition group"),
                "ingest-b did not give its leases back:\n{}",
                common::tail(&log_b)
            );
        }
        handovers.push((how, t));
        until_progress(
            &offsets,
            &b_parts,
            &format!("ingest-a on ingest-b's partitions after {how}"),
            &log_a,
        )
        .await;
    }
    // A clean leave hands over within a round or two; a death within the
    // lease (3 s) plus a round.
    assert!(handovers[0].1 < Duration::from_secs(3), "{handovers:?}");
    assert!(handovers[1].1 < Duration::from_secs(8), "{handovers:?}");

    let out = py_producer.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kafka_produce.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        python_msgs.to_string()
    );
    ours_task.await.unwrap();

    // Drain: every record committed. Offsets count records (no transaction
    // markers here), so the committed offsets add up to the messages sent.
    // (tansu 0.6.0's high watermarks lag behind the log, so they are not
    // the measure.)
    let total = (python_msgs + n_ours) as i64;
    let start = Instant::now();
    loop {
        let committed = offsets.committed_offsets().await.unwrap();
        let sum: i64 = committed.values().sum();
        if sum >= total {
            assert_eq!(sum, total, "{committed:?}");
            eprintln!("committed offsets by partition: {committed:?}");
            // Keys hash unevenly: most partitions, not all, get tickers.
            assert!(
                committed.values().filter(|o| **o > 0).count() >= 4,
                "{committed:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "committed {sum} of {total} records after 120 s: {committed:?}\n{}",
            common::tail(&log_a)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ingest-a's /metrics (Prometheus text through the metrics library).
    let text = get_metrics(metrics_port);
    for want in [
        "# TYPE tickmesh_ingest_write_seconds histogram",
        "tickmesh_ingest_write_seconds_bucket{source=\"bars\",le=\"0.05\"}",
        "# TYPE tickmesh_ingest_records_total counter",
        "# HELP tickmesh_ingest_consumer_lag ",
        &format!("tickmesh_ingest_partitions_owned{{topic=\"{topic}\"}} 6"),
        "# TYPE tickmesh_kafka_commits_total counter",
    ] {
        assert!(text.contains(want), "no `{want}` in /metrics:\n{text}");
    }
    let rows: f64 = text
        .lines()
        .find(|l| l.starts_with("tickmesh_ingest_rows_total{source=\"bars\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no bar rows in /metrics:\n{text}"));
    assert!(rows > 0.0, "{text}");
    node_a.kill().unwrap();
    node_a.wait().unwrap();

    // Read back independently: pyarrow over the S3 protocol.
    common::assert_bars_read_back(&py, &cfg, &expected, dir.path());
}
