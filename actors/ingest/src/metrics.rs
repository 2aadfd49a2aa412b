//! Counters of the ingest role, shared by every consumer of a process
//! (read in-process by the demo and tests), each also recorded as a metric
//! for `/metrics` (names and help texts in `tickmesh_io::telemetry`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Upper bounds (ms) of the object-write latency buckets.
pub const WRITE_MS_BUCKETS: [u64; 10] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000];

/// What the consumers did. Cheap to clone; all clones count together.
#[derive(Debug, Default, Clone)]
pub struct IngestMetrics(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    records: AtomicU64,
    messages: AtomicU64,
    bytes: AtomicU64,
    rows: AtomicU64,
    bars: AtomicU64,
    batches: AtomicU64,
    objects_written: AtomicU64,
    write_conflicts: AtomicU64,
    malformed: AtomicU64,
    dead_lettered: AtomicU64,
    /// Object writes by latency bucket (the last one: above every bound).
    write_ms: [AtomicU64; WRITE_MS_BUCKETS.len() + 1],
}

impl IngestMetrics {
    /// Records taken from the bus (good and bad).
    pub fn records(&self) -> u64 {
        self.0.records.load(Ordering::Relaxed)
    }
    /// Records written (valid messages).
    pub fn messages(&self) -> u64 {
        self.0.messages.load(Ordering::Relaxed)
    }
    /// Payload bytes taken from the bus.
    pub fn bytes(&self) -> u64 {
        self.0.bytes.load(Ordering::Relaxed)
    }
    /// Rows written, every source.
    pub fn rows(&self) -> u64 {
        self.0.rows.load(Ordering::Relaxed)
    }
    /// Bars written.
    pub fn bars(&self) -> u64 {
        self.0.bars.load(Ordering::Relaxed)
    }
    pub fn batches(&self) -> u64 {
        self.0.batches.load(Ordering::Relaxed)
    }
    pub fn objects_written(&self) -> u64 {
        self.0.objects_written.load(Ordering::Relaxed)
    }
    /// Conditional writes that lost to another writer (and were merged again).
    pub fn write_conflicts(&self) -> u64 {
        self.0.write_conflicts.load(Ordering::Relaxed)
    }
    pub fn malformed(&self) -> u64 {
        self.0.malformed.load(Ordering::Relaxed)
    }
    pub fn dead_lettered(&self) -> u64 {
        self.0.dead_lettered.load(Ordering::Relaxed)
    }
    /// Object writes per latency bucket, with [`WRITE_MS_BUCKETS`] as bounds.
    pub fn write_latency_buckets(&self) -> Vec<u64> {
        self.0
            .write_ms
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    pub(crate) fn add_write(&self, source: &'static str, took: Duration, conflicts: u32) {
        metrics::histogram!("tickmesh_ingest_write_seconds", "source" => source)
            .record(took.as_secs_f64());
        metrics::counter!("tickmesh_ingest_objects_written_total", "source" => source).increment(1);
        if conflicts > 0 {
            metrics::counter!("tickmesh_ingest_write_conflicts_total", "source" => source)
                .increment(conflicts as u64);
        }
        let ms = took.as_millis() as u64;
        let i = WRITE_MS_BUCKETS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(WRITE_MS_BUCKETS.len());
        self.0.write_ms[i].fetch_add(1, Ordering::Relaxed);
        self.0.objects_written.fetch_add(1, Ordering::Relaxed);
        self.0
            .write_conflicts
            .fetch_add(conflicts as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_batch(
        &self,
        source: &'static str,
        records: usize,
        good: usize,
        bytes: usize,
        rows: usize,
    ) {
        metrics::counter!("tickmesh_ingest_records_total", "source" => source)
            .increment(records as u64);
        metrics::counter!("tickmesh_ingest_bytes_total", "source" => source)
            .increment(bytes as u64);
        metrics::counter!("tickmesh_ingest_rows_total", "source" => source).increment(rows as u64);
        let add = |c: &AtomicU64, n: usize| c.fetch_add(n as u64, Ordering::Relaxed);
        add(&self.0.batches, 1);
        add(&self.0.records, records);
        add(&self.0.messages, good);
        add(&self.0.bytes, bytes);
        add(&self.0.rows, rows);
        if source == "bars" {
            add(&self.0.bars, rows);
        }
    }

    pub(crate) fn add_malformed(&self, source: &'static str, dead_lettered: bool) {
        self.0.malformed.fetch_add(1, Ordering::Relaxed);
        if dead_lettered {
            metrics::counter!("tickmesh_ingest_dead_letters_total", "source" => source)
                .increment(1);
            self.0.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
    }
}
