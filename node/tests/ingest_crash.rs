//! Exactly-once ingest under SIGKILL, on the real broker and S3 server
//! (`scripts/services.sh up`).
//!
//! About a million 1-minute bars go to `h_alpaca` from two producers at
//! once: confluent-kafka with its default batching (one message per
//! ticker-day in bursts of 20, so record batches hold many; some weeks are
//! sent a second time; `scripts/py/kafka_produce.py`) and tickmesh's own publisher (one message per ticker-week).
//! Meanwhile the ingest node, a real `tickmesh run` process, is killed with
//! SIGKILL 20 times: at random moments, and every fourth time between a
//! batch's object writes and its offset commit (a failpoint pauses it
//! there). After each kill (and before each failpoint round) one week is
//! sent again, so every round has a batch to work on however fast the
//! producers finished. Its batches are small (`ingest.batch_records = 7`), so commits
//! land inside the producer's record batches, where tansu 0.6.0 skips
//! records on the next fetch. Afterwards pyarrow reads every object back
//! through the S3 protocol: the (ticker, timestamp) rows equal what was
//! produced, with 0 missing and 0 duplicates. The recovery time after each
//! kill (until the committed offset moves again) is reported.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::{topics, BarsMessage};
use tickmesh_ingest::producer::weekly_messages;
use tickmesh_io::bus::{KafkaSubscription, Share};

struct Node {
    child: Child,
    log: std::path::PathBuf,
}

/// A failed assertion must not leave the process consuming.
impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &std::path::Path, dir: &std::path::Path, n: usize, pause: bool) -> Node {
    let log = dir.join(format!("ingest-{n}.log"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tickmesh"));
    cmd.args(["run", "--node", "ingest-1", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if pause {
        cmd.env("TICKMESH_FAILPOINT_PAUSE_BEFORE_COMMIT_MS", "4000");
    }
    Node {
        child: cmd.spawn().unwrap(),
        log,
    }
}

async fn committed(sub: &KafkaSubscription) -> i64 {
    sub.committed_offsets()
        .await
        .unwrap()
        .get(&0)
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_bars_survive_20_sigkills_with_nothing_missing_or_duplicated() {
    let py = common::python_with("confluent_kafka, pyarrow");
    let (cfg, a) = common::distributed("crash").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!(
            r#"{services}[ingest]
batch_records = 7
[[nodes]]
name = "ingest-1"
roles = ["ingest"]
"#,
            services = common::services_toml(&cfg, "crash"),
        ),
    )
    .unwrap();

    // The data: 10 tickers, 2023-12-01 .. 2024-12-31 (about 1.06M bars).
    let (from, to) = ("2023-12-01".parse().unwrap(), "2024-12-31".parse().unwrap());
    let tickers: Vec<String> = (0..10).map(|i| format!("CRSH{i}")).collect();
    let mut expected = BTreeSet::new();
    let mut python_lines = String::new();
    let mut ours: Vec<BarsMessage> = Vec::new();
    for (i, t) in tickers.iter().enumerate() {
        let bars = SyntheticMarket.bars(t, from, to);
        expected.extend(bars.iter().map(|b| (t.clone(), b.t.timestamp_micros())));
        let weeks = weekly_messages(t, &bars);
        if i < 5 {
            // confluent-kafka: one message per ticker-day.
            python_lines.push_str(&common::daily_tsv_lines(t, &bars));
        } else {
            // Ours, one message per week; confluent-kafka sends 4 weeks again.
            for w in &weeks[..4] {
                python_lines.push_str(&format!("{t}\t{}\n", serde_json::to_string(w).unwrap()));
            }
            ours.extend(weeks);
        }
    }
    assert!(expected.len() >= 1_000_000, "{} bars", expected.len());
    let lines = dir.path().join("python.tsv");
    std::fs::write(&lines, &python_lines).unwrap();
    let python_msgs = python_lines.lines().count();
    let mut total = (python_msgs + ours.len()) as i64;
    eprintln!(
        "{} bars in {} messages ({python_msgs} batched by confluent-kafka, {} ours)",
        expected.len(),
        total,
        ours.len()
    );

    let brokers = cfg.kafka.brokers.clone();
    let full_topic = format!("{}{}", cfg.kafka.topic_prefix, topics::BARS);
    // Both producers run through the kills, for about 25 s.
    let rate = (python_msgs as f64 / 25.0).to_string();
    let py_producer = Command::new(&py)
        .arg(common::repo().join("scripts/py/kafka_produce.py"))
        .args([brokers.as_str(), full_topic.as_str()])
        .arg(&lines)
        .args(["--rate", &rate, "--burst", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A week of ours sent once more (a duplicate delivery), so that every
    // kill round has a batch to work on even after the producers are done.
    let again = ours[0].clone();
    let resend = |publisher: tickmesh_io::bus::SharedPublisher| {
        let payload = serde_json::to_vec(&again).unwrap();
        async move {
            publisher
                .publish(topics::BARS, "CRSH5", &payload, &[])
                .await
                .unwrap();
        }
    };
    let publisher = a.publisher.clone();
    let ours_task = tokio::spawn(async move {
        let gap = Duration::from_secs_f64(25.0 / ours.len() as f64);
        for m in &ours {
            let payload = serde_json::to_vec(m).unwrap();
            publisher
                .publish(topics::BARS, &m.ticker, &payload, &[])
                .await
                .unwrap();
            tokio::time::sleep(gap).await;
        }
    });

    // Reads the committed offset of the ingest group straight from the broker.
    let group = format!("{}-ingest", cfg.kafka.group_id);
    let offsets = KafkaSubscription::new(
        &brokers,
        &cfg.kafka.topic_prefix,
        &group,
        topics::BARS,
        Share::ALL,
    )
    .await
    .unwrap();

    let mut n = 0;
    let mut node = spawn(&config, dir.path(), n, false);
    let mut recoveries: Vec<Duration> = Vec::new();
    let mut kills = 0;
    while kills < 20 {
        let pause = kills % 4 == 3;
        if pause {
            // Restart with the failpoint and kill it between write and commit.
            node.child.kill().unwrap();
            node.child.wait().unwrap();
            n += 1;
            node = spawn(&config, dir.path(), n, true);
            resend(a.publisher.clone()).await;
            total += 1;
            let start = Instant::now();
            loop {
                let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                if log.contains("pausing before its commit") {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "the failpoint never paused:\n{}",
                    common::tail(&node.log)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            let ms = 300 + rand::random::<u64>() % 1200;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let before = committed(&offsets).await;
        node.child.kill().unwrap(); // SIGKILL
        node.child.wait().unwrap();
        let killed_at = Instant::now();
        kills += 1;
        n += 1;
        node = spawn(&config, dir.path(), n, false);
        resend(a.publisher.clone()).await;
        total += 1;
        // Recovery: until the committed offset moves past where it was
        // (the resent week at least is there to commit).
        loop {
            if committed(&offsets).await > before {
                recoveries.push(killed_at.elapsed());
                break;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(60),
                "kill {kills}: nothing committed for 60 s after the restart:\n{}",
                common::tail(&node.log)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

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

    // Drain: every record committed.
    let start = Instant::now();
    while committed(&offsets).await < total {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "committed {} of {total} after 180 s:\n{}",
            committed(&offsets).await,
            common::tail(&node.log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    node.child.kill().unwrap();
    node.child.wait().unwrap();

    // How often a restart resumed inside a record batch that the broker
    // then skipped, and the consumer sought back for it.
    let mut hunted = 0;
    for i in 0..=n {
        let log =
            std::fs::read_to_string(dir.path().join(format!("ingest-{i}.log"))).unwrap_or_default();
        hunted += log.matches("the broker skipped offsets").count();
    }
    eprintln!("restarts that found the broker skipping records and sought back: {hunted}");
    assert!(
        hunted > 0,
        "no restart resumed inside a skipped batch: the test lost its point"
    );

    recoveries.sort();
    let p50 = recoveries[recoveries.len() / 2];
    let max = *recoveries.last().unwrap();
    eprintln!(
        "{kills} SIGKILLs; recovery until the committed offset moved again ({} measured): p50 {:.2} s, max {:.2} s",
        recoveries.len(),
        p50.as_secs_f64(),
        max.as_secs_f64()
    );
    assert!(recoveries.len() >= 10, "too few recoveries measured");
    assert!(
        max < Duration::from_secs(15),
        "a restart took {max:?} to make progress"
    );

    // Read back independently: pyarrow over the S3 protocol.
    common::assert_bars_read_back(&py, &cfg, &expected, dir.path());
}
