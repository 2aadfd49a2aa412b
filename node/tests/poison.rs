//! Poison pills on Kafka (the real broker `scripts/services.sh up` starts):
//! bars whose times no calendar has (year -262143, 0001, 9999), bars on a
//! weekend and a holiday, a message whose processing panics (a failpoint)
//! and one over the configured `ingest.max_message_bytes` go to
//! `h_alpaca.dlq` with their reasons. The consumer never
//! restarts into them: the good message behind them is written, and every
//! offset is committed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use tickmesh_core::config::Role;
use tickmesh_core::types::topics;
use tickmesh_ingest::producer;
use tickmesh_io::store::buckets;

/// The configured payload limit of this test (`ingest.max_message_bytes`).
const LIMIT: usize = 1024 * 1024;

/// One bar; ticker `HUGE`'s message is padded with spaces past [`LIMIT`]
/// (valid JSON otherwise).
fn bar(ticker: &str, t: &str) -> Vec<u8> {
    let mut m =
        format!(r#"{{"ticker":"{ticker}","bars":[{{"t":"{t}","o":1,"h":1,"l":1,"c":1,"v":1}}]}}"#)
            .into_bytes();
    if ticker == "HUGE" {
        m.resize(LIMIT + 1, b' ');
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_pills_go_to_the_dead_letter_topic_and_the_consumer_goes_on() {
    // This file's only test: no other thread reads the environment.
    unsafe { std::env::set_var("TICKMESH_FAILPOINT_PANIC_KEY", "PANC") };
    let (mut cfg, a) = distributed("poison").await;
    cfg.ingest.max_message_bytes = LIMIT;
    let node = start(&cfg, &a, &[Role::Ingest]).await;
    let poison = [
        ("AAPL", "-262143-01-01T00:00:00Z", "outside"),
        ("AAPL", "0001-01-01T14:30:00Z", "outside"),
        ("AAPL", "9999-12-31T14:30:00Z", "outside"),
        ("AAPL", "2024-01-06T14:30:00Z", "Sat"),
        ("AAPL", "2024-12-25T14:30:00Z", "not an NYSE trading day"),
        ("PANC", "2024-01-08T14:30:00Z", "panicked"),
        (
            "HUGE",
            "2024-01-08T14:30:00Z",
            "exceeds ingest.max_message_bytes = 1048576",
        ),
    ];
    for (t, ts, _) in poison {
        a.publisher
            .publish(topics::BARS, t, &bar(t, ts), &[])
            .await
            .unwrap();
    }
    // A good week behind them.
    let n = producer::publish_synthetic(
        a.publisher.as_ref(),
        &["TSTP".into()],
        "2024-01-08".parse().unwrap(),
        "2024-01-12".parse().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(n, 1);
    let m = node.ingest_metrics.clone();
    eventually(
        "the good message written and every poison pill dead-lettered",
        Duration::from_secs(60),
        || {
            let m = m.clone();
            async move { m.messages() == 1 && m.dead_lettered() == poison.len() as u64 }
        },
    )
    .await;
    let keys = a.store.list(buckets::STOCK_DATA, "TSTP/").await.unwrap();
    assert_eq!(keys, vec!["TSTP/2024/01/TSTP_2024-W02.parquet"]);
    assert!(
        a.store
            .list(buckets::STOCK_DATA, "AAPL/")
            .await
            .unwrap()
            .is_empty(),
        "no poison stored"
    );

    // The dead letters, each with its topic, offset and reason.
    let mut dlq = a
        .bus
        .subscribe(&topics::dlq(topics::BARS), "dlq-reader")
        .await
        .unwrap();
    let mut got: BTreeMap<i64, String> = BTreeMap::new();
    while got.len() < poison.len() {
        let rec = dlq
            .poll(Duration::from_secs(20))
            .await
            .unwrap()
            .expect("a dead letter");
        assert_eq!(rec.headers["tickmesh.topic"], "h_alpaca");
        got.insert(
            rec.headers["tickmesh.offset"].parse().unwrap(),
            rec.headers["tickmesh.error"].clone(),
        );
    }
    for (i, (_, _, why)) in poison.iter().enumerate() {
        let e = &got[&(i as i64)];
        assert!(e.contains(why), "offset {i}: {e}");
    }
    node.stop().await;

    // Every offset was committed: the group has nothing left to read.
    let mut again = a.bus.subscribe(topics::BARS, "ingest").await.unwrap();
    assert!(
        again.poll(Duration::from_secs(8)).await.unwrap().is_none(),
        "offsets were not committed"
    );
}
