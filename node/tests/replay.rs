//! `tickmesh produce replay` on Kafka (tansu): stored bars of two tickers,
//! read from an object directory, arrive on `live_bars` as a live feed:
//! every bar once, keyed by its ticker, one ticker-week per message, in
//! market-time order across tickers, and paced (at 6000x a day of minute
//! bars takes at least 390 × 10 ms).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::{topics, BarsMessage, IsoWeek};
use tickmesh_io::store::LocalStore;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_bars_replay_into_live_bars_in_order_and_paced() {
    let (cfg, a) = distributed("replay").await;
    let dir = tempfile::tempdir().unwrap();
    let archive = LocalStore::open(dir.path().join("archive")).unwrap();
    let from = "2024-05-13".parse().unwrap(); // a Monday
    let mut stored = BTreeMap::new();
    for t in ["RPLA", "RPLB"] {
        // Two days stored, one replayed.
        let bars = SyntheticMarket.bars(t, from, "2024-05-14".parse().unwrap());
        for msg in tickmesh_ingest::producer::weekly_messages(t, &bars) {
            tickmesh_ingest::bars_consumer::write_bars(&archive, &msg)
                .await
                .unwrap();
        }
        stored.insert(
            t.to_string(),
            bars.into_iter()
                .filter(|b| tickmesh_core::calendar::ny_date(b.t) == from)
                .collect::<Vec<_>>(),
        );
    }
    let expected: usize = stored.values().map(Vec::len).sum();
    assert_eq!(expected, 2 * 390);
    let config = dir.path().join("cluster.toml");
    std::fs::write(&config, services_toml(&cfg, "replay")).unwrap();
    let mut reader = a
        .bus
        .subscribe(topics::LIVE_BARS, "replay-reader")
        .await
        .unwrap();

    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tickmesh"))
        .args(["produce", "--config"])
        .arg(&config)
        .args([
            "replay",
            "--tickers",
            "RPLA,RPLB",
            "--from",
            "2024-05-13",
            "--to",
            "2024-05-13",
        ])
        .args(["--speed", "6000x", "--store"])
        .arg(dir.path().join("archive"))
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // 390 bar times, 389 steps of a minute: at 6000x, 10 ms each.
    let floor = Duration::from_millis(389 * 10);
    println!("replayed {expected} bars in {took:?} (at least {floor:?})");
    assert!(took >= floor, "replayed in {took:?}, faster than its pace");

    let mut got: BTreeMap<String, Vec<tickmesh_core::types::Bar>> = BTreeMap::new();
    let mut last_time = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 0;
    while n < expected {
        assert!(
            Instant::now() < deadline,
            "{n} of {expected} bars read back"
        );
        for rec in reader
            .poll_batch(500, Duration::from_millis(500))
            .await
            .unwrap()
        {
            let m: BarsMessage = serde_json::from_slice(&rec.payload).unwrap();
            assert_eq!(rec.key.as_deref(), Some(m.ticker.as_str()));
            let week = IsoWeek::of(m.bars[0].t);
            assert!(
                m.bars.iter().all(|b| IsoWeek::of(b.t) == week),
                "one ticker-week a message"
            );
            // Across tickers, messages come in market-time order (bars due
            // together go together, a message per ticker).
            if let Some(t) = last_time {
                assert!(m.bars[0].t >= t, "{} before {t}", m.bars[0].t);
            }
            last_time = Some(m.bars[0].t);
            n += m.bars.len();
            got.entry(m.ticker).or_default().extend(m.bars);
        }
    }
    assert_eq!(got, stored, "every stored bar once, in order");
}
