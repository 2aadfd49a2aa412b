//! The aggregate role on its own (`[aggregate]` in cluster.toml): each
//! tick, the aggregator
//!
//! 1. runs the Admin API's queued requests (`aggregate_requests`), claimed
//!    under a lease so a request whose node died is taken over;
//! 2. with `on_ingest`, once the ingest watermarks have stood still for
//!    `settle_secs`, aggregates every active ticker whose watermark moved
//!    past what its series last consumed (`aggregate_marks`), for each of
//!    `intervals`;
//! 3. every `schedule_secs`, aggregates every active ticker with data.
//!
//! Each run publishes one `start_model` (tickers, interval, watermark) and
//! is recorded in `aggregate_requests` with its trigger and outcome, so a
//! failure is visible through the Admin API, not only in a log line. A
//! failed automatic run is tried again after `retry_secs`, doubling.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tickmesh_core::config::AggregateConfig;
use tickmesh_core::types::Interval;
use tickmesh_core::Result;
use tracing::{error, info};

use crate::aggregator::{run, AggregateReport, AggregatorArgs};

/// What the automatic role needs besides the aggregator's arguments.
#[derive(Debug, Clone)]
pub struct Auto {
    pub config: AggregateConfig,
    /// This node's name (who holds a claimed request).
    pub node: String,
}

/// What the automatic role remembers between ticks.
#[derive(Debug)]
pub struct Watch {
    seen: Vec<(String, DateTime<Utc>)>,
    changed: Instant,
    next_schedule: Instant,
    retry: HashMap<Interval, (Instant, u32)>,
    /// Ticks in a row that failed (the database unreachable, say).
    pub failures: u32,
}

impl Watch {
    pub fn new(config: &AggregateConfig) -> Self {
        let now = Instant::now();
        Watch {
            seen: Vec::new(),
            changed: now,
            next_schedule: now + Duration::from_secs(config.schedule_secs),
            retry: HashMap::new(),
            failures: 0,
        }
    }
}

fn summary(r: &AggregateReport) -> String {
    let rows: usize = r.rows.values().sum();
    format!(
        "{} tickers, {rows} rows, watermark {}",
        r.rows.len(),
        r.watermark
            .map_or_else(|| "none".to_string(), |w| w.to_rfc3339())
    )
}

/// One automatic run of `tickers` (with the watermarks it consumes),
/// recorded, its marks set when it succeeded.
async fn automatic(
    args: &AggregatorArgs,
    trigger: &str,
    pending: &[(String, DateTime<Utc>)],
    interval: Interval,
) -> Result<std::result::Result<(), String>> {
    let tickers: Vec<String> = pending.iter().map(|(t, _)| t.clone()).collect();
    info!(trigger, %interval, tickers = tickers.len(), "automatic aggregation");
    let outcome = run(args, &tickers, interval).await;
    match &outcome {
        Ok(report) => {
            args.db.set_aggregate_marks(interval, pending).await?;
            args.db
                .log_aggregate_run(trigger, &tickers, interval, Ok(&summary(report)))
                .await?;
            Ok(Ok(()))
        }
        Err(e) => {
            let e = e.to_string();
            error!(trigger, %interval, error = %e, "automatic aggregation failed; it is tried again");
            args.db
                .log_aggregate_run(trigger, &tickers, interval, Err(&e))
                .await?;
            Ok(Err(e))
        }
    }
}

/// One tick (see the module header).
pub async fn tick(args: &AggregatorArgs, auto: &Auto, watch: &mut Watch) -> Result<()> {
    let cfg = &auto.config;
    let db = &args.db;
    // 1. The Admin API's requests.
    let lease = chrono::Duration::seconds(cfg.request_lease_secs as i64);
    while let Some(req) = db
        .claim_aggregate_request(&auto.node, Utc::now() + lease)
        .await?
    {
        let marks = db.active_watermarks().await?;
        let tickers = if req.tickers.is_empty() {
            marks.iter().map(|(t, _)| t.clone()).collect()
        } else {
            req.tickers.clone()
        };
        info!(id = %req.id, interval = %req.interval, tickers = tickers.len(), "aggregation requested");
        let outcome = if tickers.is_empty() {
            Err("no active ticker has ingested bars".to_string())
        } else {
            run(args, &tickers, req.interval)
                .await
                .map_err(|e| e.to_string())
        };
        if let Ok(report) = &outcome {
            let done: Vec<(String, DateTime<Utc>)> = marks
                .into_iter()
                .filter(|(t, _)| report.rows.contains_key(t))
                .collect();
            db.set_aggregate_marks(req.interval, &done).await?;
        }
        db.finish_aggregate_request(&req.id, outcome.map(|r| summary(&r)))
            .await?;
    }

    let now = Instant::now();
    // 2. Ingest watermarks, once they stand still.
    if cfg.on_ingest {
        let wm = db.active_watermarks().await?;
        if wm != watch.seen {
            watch.seen = wm;
            watch.changed = now;
        } else if now.duration_since(watch.changed) >= Duration::from_secs(cfg.settle_secs) {
            for &interval in &cfg.intervals {
                if watch.retry.get(&interval).is_some_and(|(at, _)| now < *at) {
                    continue;
                }
                let marks = db.aggregate_marks(interval).await?;
                let pending: Vec<(String, DateTime<Utc>)> = watch
                    .seen
                    .iter()
                    .filter(|(t, w)| marks.get(t).is_none_or(|m| m < w))
                    .cloned()
                    .collect();
                if pending.is_empty() {
                    continue;
                }
                match automatic(args, "ingest", &pending, interval).await? {
                    Ok(()) => {
                        watch.retry.remove(&interval);
                    }
                    Err(_) => {
                        let n = watch.retry.get(&interval).map_or(0, |(_, n)| n + 1);
                        let wait = Duration::from_secs(cfg.retry_secs) * 2u32.pow(n.min(6));
                        watch.retry.insert(interval, (Instant::now() + wait, n));
                    }
                }
            }
        }
    }

    // 3. The schedule.
    if cfg.schedule_secs > 0 && now >= watch.next_schedule {
        watch.next_schedule = now + Duration::from_secs(cfg.schedule_secs);
        let all = db.active_watermarks().await?;
        if !all.is_empty() {
            for &interval in &cfg.intervals {
                automatic(args, "schedule", &all, interval).await?.ok();
            }
        }
    }
    Ok(())
}
