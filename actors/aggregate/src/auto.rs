//! The aggregate role on its own (`[aggregate]` in cluster.toml): each
//! tick, the aggregator
//!
//! 1. runs the Admin API's queued requests (`aggregate_requests`), claimed
//!    under a lease so a request whose node died is taken over;
//! 2. with `on_ingest`, once the ingest watermarks have stood still for
//!    `settle_secs`, aggregates every active ticker whose version (any
//!    write of its bars or fundamentals, or of a macro series) moved past
//!    what its series last consumed (`aggregate_marks`), for each of
//!    `intervals`; a failed ticker stays pending while the others are marked;
//! 3. every `schedule_secs`, aggregates every active ticker with data.
//!
//! Each run publishes one `start_model` (the tickers whose rows changed,
//! interval, watermark; none when nothing changed) and is recorded in `aggregate_requests` with its trigger and outcome, so a
//! failure is visible through the Admin API, not only in a log line. A
//! failed automatic run is tried again after `retry_secs`, doubling.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use tickmesh_core::config::AggregateConfig;
use tickmesh_core::types::Interval;
use tickmesh_core::Result;
use tickmesh_io::db::{AggregateRequest, Watermark};
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
    seen: Vec<Watermark>,
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
        "{} tickers, {rows} rows, {} changed, watermark {}",
        r.rows.len(),
        r.changed.len(),
        r.watermark
            .map_or_else(|| "none".to_string(), |w| w.to_rfc3339())
    )
}

/// One automatic run of `tickers`, recorded with its outcome (`run` marks
/// what loaded). Returns whether it failed.
async fn automatic(
    args: &AggregatorArgs,
    trigger: &str,
    tickers: &[String],
    interval: Interval,
) -> Result<bool> {
    info!(trigger, %interval, tickers = tickers.len(), "automatic aggregation");
    let outcome = run(args, tickers, interval).await;
    let text = match &outcome {
        Ok(report) => Ok(summary(report)),
        Err(e) => {
            error!(trigger, %interval, error = %e, "automatic aggregation failed; it is tried again");
            Err(e.to_string())
        }
    };
    args.db
        .log_aggregate_run(
            trigger,
            tickers,
            interval,
            text.as_deref().map_err(String::as_str),
        )
        .await?;
    Ok(outcome.is_err())
}

/// Runs a claimed Admin request, renewing its lease while it runs.
async fn requested(args: &AggregatorArgs, auto: &Auto, req: AggregateRequest) -> Result<()> {
    let db = &args.db;
    let lease = Duration::from_secs(auto.config.request_lease_secs);
    let tickers: Vec<String> = if req.tickers.is_empty() {
        db.active_watermarks()
            .await?
            .into_iter()
            .map(|w| w.ticker)
            .collect()
    } else {
        req.tickers.clone()
    };
    info!(id = %req.id, interval = %req.interval, tickers = tickers.len(), "aggregation requested");
    let renew = {
        let (db, id, node) = (db.clone(), req.id.clone(), auto.node.clone());
        async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                let until = Utc::now() + chrono::Duration::from_std(lease).unwrap_or_default();
                match db.renew_aggregate_request(&id, &node, until).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => error!(%id, error = %e, "could not renew the request's lease"),
                }
            }
        }
    };
    let work = async {
        if tickers.is_empty() {
            Err("no active ticker has ingested bars".to_string())
        } else {
            run(args, &tickers, req.interval)
                .await
                .map(|r| summary(&r))
                .map_err(|e| e.to_string())
        }
    };
    let outcome = tokio::select! {
        o = work => o,
        () = renew => return Ok(()),
    };
    if !db
        .finish_aggregate_request(&req.id, &auto.node, outcome)
        .await?
    {
        error!(id = %req.id, "another node took the request over before it finished here");
    }
    Ok(())
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
        requested(args, auto, req).await?;
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
                let pending: Vec<String> = watch
                    .seen
                    .iter()
                    .filter(|w| marks.get(&w.ticker).is_none_or(|&m| m < w.version))
                    .map(|w| w.ticker.clone())
                    .collect();
                if pending.is_empty() {
                    continue;
                }
                if automatic(args, "ingest", &pending, interval).await? {
                    let n = watch.retry.get(&interval).map_or(0, |(_, n)| n + 1);
                    let wait = Duration::from_secs(cfg.retry_secs) * 2u32.pow(n.min(6));
                    watch.retry.insert(interval, (Instant::now() + wait, n));
                } else {
                    watch.retry.remove(&interval);
                }
            }
        }
    }

    // 3. The schedule.
    if cfg.schedule_secs > 0 && now >= watch.next_schedule {
        watch.next_schedule = now + Duration::from_secs(cfg.schedule_secs);
        let all: Vec<String> = db
            .active_watermarks()
            .await?
            .into_iter()
            .map(|w| w.ticker)
            .collect();
        if !all.is_empty() {
            for &interval in &cfg.intervals {
                automatic(args, "schedule", &all, interval).await?;
            }
        }
    }
    Ok(())
}
