//! Live mode on the real broker, S3 server and PostgreSQL
//! (`scripts/services.sh up`): bars on `live_bars` append the rows of the
//! buckets they complete (read in a consumer group of its own beside the
//! ingest role's), and those rows equal what a batch run over the same bars
//! writes, bit for bit, at 1m and 15m, including buckets split across
//! records.

mod common;

use std::time::Duration;

use common::*;
use tickmesh_aggregate::aggregator;
use tickmesh_core::config::Role;
use tickmesh_core::synthetic::SyntheticMarket;
use tickmesh_core::types::{topics, BarsMessage, Interval};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_bars_append_the_rows_a_batch_run_writes() {
    let (mut cfg, a) = distributed("agglive").await;
    cfg.aggregate.live = true;
    cfg.aggregate.on_ingest = false;
    cfg.aggregate.intervals = vec![Interval::M1, Interval::M15];
    // Two weeks of history, aggregated by a batch run.
    store_synthetic(&a, "LIVA", "2024-06-03", "2024-06-14").await;
    let args = aggregator_args(&a);
    for interval in [Interval::M1, Interval::M15] {
        aggregator::run(&args, &["LIVA".into()], interval)
            .await
            .unwrap();
    }
    let node = start(&cfg, &a, &[Role::Ingest, Role::Aggregate]).await;

    // The next week arrives live (Juneteenth closed: four sessions), in
    // records that end mid-bucket: 37 bars each, 15-minute buckets split.
    let week = SyntheticMarket.bars(
        "LIVA",
        "2024-06-17".parse().unwrap(),
        "2024-06-21".parse().unwrap(),
    );
    assert_eq!(week.len(), 4 * 390);
    let publish = |chunks: Vec<Vec<tickmesh_core::types::Bar>>| {
        let publisher = a.publisher.clone();
        async move {
            for bars in chunks {
                let msg = BarsMessage {
                    ticker: "LIVA".into(),
                    bars,
                };
                publisher
                    .publish(
                        topics::LIVE_BARS,
                        "LIVA",
                        &serde_json::to_vec(&msg).unwrap(),
                        &[],
                    )
                    .await
                    .unwrap();
            }
        }
    };
    let chunks: Vec<Vec<_>> = week.chunks(37).map(|c| c.to_vec()).collect();
    // 20 records: the second day up to 15:19, inside the 15:15 bucket.
    publish(chunks[..20].to_vec()).await;
    let db = a.db.clone();
    eventually("the first live rows", Duration::from_secs(60), || {
        let db = db.clone();
        async move { db.count_aggregated("LIVA", Interval::M1).await.unwrap() == 10 * 390 + 740 }
    })
    .await;
    // Stopped with the 15:15 bucket unfinished: its bars' record is not
    // committed, so the next process gets it again.
    node.stop().await;
    assert_eq!(
        a.db.count_aggregated("LIVA", Interval::M15).await.unwrap(),
        10 * 26 + 26 + 23
    );
    let node = start(&cfg, &a, &[Role::Ingest, Role::Aggregate]).await;
    publish(chunks[20..].to_vec()).await;
    let db = a.db.clone();
    eventually("the live rows", Duration::from_secs(120), || {
        let db = db.clone();
        async move {
            db.count_aggregated("LIVA", Interval::M1).await.unwrap() == 14 * 390
                && db.count_aggregated("LIVA", Interval::M15).await.unwrap() == 14 * 26
        }
    })
    .await;
    let store = a.store.clone();
    eventually(
        "the ingest role writes the live week",
        Duration::from_secs(60),
        || {
            let store = store.clone();
            async move {
                aggregator::read_ticker_bars(&store, "LIVA")
                    .await
                    .is_ok_and(|b| b.len() == 14 * 390)
            }
        },
    )
    .await;
    node.stop().await;

    let mut columns = cfg.features.columns();
    columns.extend(cfg.joins.columns());
    for interval in [Interval::M1, Interval::M15] {
        let live =
            a.db.read_aggregated("LIVA", interval, &columns, None)
                .await
                .unwrap();
        // A batch run over the same bars (the ingest role wrote the live
        // week to its object) replaces the series: nothing may change.
        let report = aggregator::run(&args, &["LIVA".into()], interval)
            .await
            .unwrap();
        assert_eq!(report.rows["LIVA"], live.len());
        let batch =
            a.db.read_aggregated("LIVA", interval, &columns, None)
                .await
                .unwrap();
        assert_eq!(live.len(), batch.len());
        for (l, b) in live.iter().zip(&batch) {
            assert_eq!(
                l, b,
                "{interval}: the live row at {} differs from the batch row",
                l.ts
            );
        }
    }
}
