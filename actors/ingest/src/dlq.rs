//! `tickmesh dlq list|replay <topic>`: the dead letters of a topic, and
//! their re-injection after a fix.
//!
//! - **list** shows the dead letters a replay would re-inject: those after
//!   the replay group's committed offsets (`--all`: every one still on the
//!   bus), each with the headers the consumer wrote (source topic,
//!   partition, offset, error, when).
//! - **replay** reads `<topic>.dlq` in the group `dlq-replay` and publishes
//!   each dead letter's payload again to its source topic, with its key and
//!   a `tickmesh.replayed_from` header, then commits. Only dead letters
//!   written before the replay started are taken: one that fails again is
//!   dead-lettered anew, and waits for the next replay instead of looping.
//!   A dead letter whose payload was truncated (over
//!   [`DLQ_MAX_PAYLOAD`](tickmesh_io::bus::DLQ_MAX_PAYLOAD)) cannot be
//!   replayed: it is counted and left for an operator.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tickmesh_core::types::topics;
use tickmesh_core::{Error, Result};
use tickmesh_io::bus::{BusConfig, Publisher, Record};

/// The consumer group whose committed offsets mark what was replayed.
pub const REPLAY_GROUP: &str = "dlq-replay";

/// How long the bus must stay silent before a listing or replay ends.
const IDLE: Duration = Duration::from_secs(3);

/// One dead letter, as `dlq list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub source_topic: String,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    pub error: String,
    pub dead_lettered_at: Option<DateTime<Utc>>,
    /// The payload's size as dead-lettered.
    pub payload_bytes: usize,
    /// The original size when the payload was cut.
    pub truncated_from: Option<usize>,
    /// The payload's first 200 characters.
    pub payload_head: String,
    #[serde(skip)]
    pub payload: Vec<u8>,
}

impl DeadLetter {
    fn from_record(rec: Record) -> Self {
        let h = |k: &str| rec.headers.get(k).cloned();
        DeadLetter {
            partition: rec.partition,
            offset: rec.offset,
            key: rec.key.clone(),
            source_topic: h("tickmesh.topic").unwrap_or_default(),
            source_partition: h("tickmesh.partition").and_then(|v| v.parse().ok()),
            source_offset: h("tickmesh.offset").and_then(|v| v.parse().ok()),
            error: h("tickmesh.error").unwrap_or_default(),
            dead_lettered_at: h("tickmesh.dead_lettered_at").and_then(|v| v.parse().ok()),
            payload_bytes: rec.payload.len(),
            truncated_from: h("tickmesh.truncated_from").and_then(|v| v.parse().ok()),
            payload_head: String::from_utf8_lossy(&rec.payload)
                .chars()
                .take(200)
                .collect(),
            payload: rec.payload,
        }
    }
}

/// The source topic named by an operator: `h_alpaca` or `h_alpaca.dlq`.
fn dlq_topic(topic: &str) -> Result<(String, String)> {
    let source = topic.strip_suffix(".dlq").unwrap_or(topic);
    let known = [
        topics::BARS,
        topics::LIVE_BARS,
        topics::MACRO,
        topics::COMPANY,
        topics::START_MODEL,
    ];
    if !known.contains(&source) {
        return Err(Error::invalid(
            "dlq",
            format!(
                "`{topic}` is not a pipeline topic; one of {}",
                known.join(", ")
            ),
        ));
    }
    Ok((source.to_string(), topics::dlq(source)))
}

/// The dead letters of `topic` (see the module docs for which).
pub async fn list(bus: &BusConfig, topic: &str, all: bool) -> Result<Vec<DeadLetter>> {
    let (_, dlq) = dlq_topic(topic)?;
    // `dlq-list` never commits, so it always starts from the beginning.
    let group = if all { "dlq-list" } else { REPLAY_GROUP };
    let mut sub = bus.subscribe(&dlq, group).await?;
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < IDLE {
        let batch = sub.poll_batch(500, Duration::from_millis(500)).await?;
        if !batch.is_empty() {
            quiet_since = Instant::now();
        }
        out.extend(batch.into_iter().map(DeadLetter::from_record));
    }
    out.sort_by_key(|d| (d.partition, d.offset));
    Ok(out)
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub replayed: usize,
    /// Truncated payloads, left in the dead-letter topic.
    pub not_replayable: usize,
}

/// Re-injects the dead letters of `topic` (see the module docs).
pub async fn replay(
    bus: &BusConfig,
    publisher: &dyn Publisher,
    topic: &str,
) -> Result<ReplayReport> {
    let (source, dlq) = dlq_topic(topic)?;
    let started = Utc::now();
    let mut sub = bus.subscribe(&dlq, REPLAY_GROUP).await?;
    let mut report = ReplayReport::default();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < IDLE {
        let batch = sub.poll_batch(500, Duration::from_millis(500)).await?;
        let mut done = Vec::new();
        for rec in batch {
            let letter = DeadLetter::from_record(rec.clone());
            // Dead-lettered during this replay: the next replay's work.
            if letter.dead_lettered_at.is_some_and(|t| t >= started) {
                continue;
            }
            quiet_since = Instant::now();
            if letter.truncated_from.is_some() {
                report.not_replayable += 1;
                tracing::warn!(partition = letter.partition, offset = letter.offset, size = ?letter.truncated_from, "dead letter truncated; not replayed");
            } else {
                let from = format!("{dlq}/{}/{}", letter.partition, letter.offset);
                publisher
                    .publish(
                        &source,
                        letter.key.as_deref().unwrap_or(""),
                        &letter.payload,
                        &[("tickmesh.replayed_from", from)],
                    )
                    .await?;
                report.replayed += 1;
            }
            done.push(rec);
        }
        if !done.is_empty() {
            sub.commit_batch(&done).await?;
        }
    }
    Ok(report)
}
