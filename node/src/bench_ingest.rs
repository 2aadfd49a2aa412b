//! `tickmesh bench-ingest` (hidden; run by `scripts/bench/ingest.sh`): the
//! ingest role's throughput, Kafka → Parquet in the object store, on
//! records already on the topic. It starts the ingest role in this process
//! exactly as `tickmesh run` does, waits until the consumers have written
//! `records` records, and prints one JSON line: records, bars, objects,
//! seconds (from the role's start), bars per second, the process's peak
//! resident memory and its resident memory at the start (the binary links
//! libtorch and its CUDA libraries, which alone take about 480 MiB here).

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;
use tickmesh_core::config::{ClusterConfig, Role};
use tickmesh_io::Adapters;

/// A `/proc/self/status` size (`VmHWM`, `VmRSS`, …), in bytes.
pub fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The process's peak resident set (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM")
}

pub async fn run(
    cfg: &ClusterConfig,
    records: u64,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let start_rss = status_bytes("VmRSS");
    let adapters = Adapters::connect(cfg).await?;
    let started = Instant::now();
    let node = crate::roles::start(cfg, "bench-ingest", &[Role::Ingest], &adapters).await?;
    let m = node.ingest_metrics.clone();
    let mut last = (0u64, Instant::now());
    while m.records() < records {
        if started.elapsed() > timeout {
            node.stop().await;
            bail!(
                "{} of {records} records after {} s",
                m.records(),
                timeout.as_secs()
            );
        }
        if last.1.elapsed() >= Duration::from_secs(5) {
            let rate = (m.bars() - last.0) as f64 / last.1.elapsed().as_secs_f64();
            tracing::warn!(
                records = m.records(),
                of = records,
                bars = m.bars(),
                bars_per_s = rate as u64,
                "ingesting"
            );
            last = (m.bars(), Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let out = json!({
        "records": m.records(),
        "bars": m.bars(),
        "objects_written": m.objects_written(),
        "malformed": m.malformed(),
        "seconds": secs,
        "bars_per_s": m.bars() as f64 / secs,
        "peak_rss_bytes": peak_rss_bytes(),
        "start_rss_bytes": start_rss,
    });
    node.stop().await;
    Ok(out)
}
