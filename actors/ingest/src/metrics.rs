//! Counters of the ingest role, shared by every consumer of a process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What the bar consumers did. Cheap to clone; all clones count together.
#[derive(Debug, Default, Clone)]
pub struct IngestMetrics(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    messages: AtomicU64,
    bars: AtomicU64,
    objects_written: AtomicU64,
    malformed: AtomicU64,
    dead_lettered: AtomicU64,
}

impl IngestMetrics {
    pub fn messages(&self) -> u64 {
        self.0.messages.load(Ordering::Relaxed)
    }
    pub fn bars(&self) -> u64 {
        self.0.bars.load(Ordering::Relaxed)
    }
    pub fn objects_written(&self) -> u64 {
        self.0.objects_written.load(Ordering::Relaxed)
    }
    pub fn malformed(&self) -> u64 {
        self.0.malformed.load(Ordering::Relaxed)
    }
    pub fn dead_lettered(&self) -> u64 {
        self.0.dead_lettered.load(Ordering::Relaxed)
    }
    pub(crate) fn add_message(&self, bars: usize, objects: usize) {
        self.0.messages.fetch_add(1, Ordering::Relaxed);
        self.0.bars.fetch_add(bars as u64, Ordering::Relaxed);
        self.0
            .objects_written
            .fetch_add(objects as u64, Ordering::Relaxed);
    }
    pub(crate) fn add_malformed(&self, dead_lettered: bool) {
        self.0.malformed.fetch_add(1, Ordering::Relaxed);
        if dead_lettered {
            self.0.dead_lettered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Prometheus text exposition of the counters.
    pub fn prometheus(&self) -> String {
        format!(
            "tickmesh_ingest_messages_total {}\ntickmesh_ingest_bars_total {}\ntickmesh_ingest_objects_written_total {}\ntickmesh_ingest_malformed_total {}\ntickmesh_ingest_dead_lettered_total {}\n",
            self.messages(),
            self.bars(),
            self.objects_written(),
            self.malformed(),
            self.dead_lettered()
        )
    }
}
