//! The message bus: Kafka (distributed) or a file spool (embedded).
//!
//! Both adapters give at-least-once delivery with explicit commits: a record
//! handed out by [`Subscription::poll`] is delivered again after a restart
//! unless [`Subscription::commit`] was called for it. Topic names given to
//! these types are the logical names of [`tickmesh_core::types::topics`]; a
//! configured prefix is added by the Kafka adapter.
//!
//! The spool keeps one directory per topic under its root (`data/raw/` in
//! the embedded mode). A message is one file whose content is the payload
//! (so a person can drop a JSON file there); optional headers sit beside it
//! in `NAME.headers.json`. Committing moves the file into `.done/`, which
//! keeps the newest [`SPOOL_DONE_KEEP`] files.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use tickmesh_core::{Error, Result};

/// One message taken from the bus.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
    /// The spool file behind this record, if any.
    origin: Option<PathBuf>,
}

/// Publishes messages.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    async fn publish(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, String)],
    ) -> Result<()>;
}

pub type SharedPublisher = Arc<dyn Publisher>;

/// Reads one topic with explicit commits.
#[async_trait]
pub trait Subscription: Send + 'static {
    /// Waits up to `wait` for the next record, then takes whatever else is
    /// ready, up to `max` records in all. Empty when `wait` ran out.
    async fn poll_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>>;
    /// Marks `recs` (and everything before each on its partition) as
    /// processed.
    async fn commit_batch(&mut self, recs: &[Record]) -> Result<()>;
    /// Waits up to `wait` for the next record.
    async fn poll(&mut self, wait: Duration) -> Result<Option<Record>> {
        Ok(self.poll_batch(1, wait).await?.into_iter().next())
    }
    /// Marks `rec` (and everything before it on its partition) as processed.
    async fn commit(&mut self, rec: &Record) -> Result<()> {
        self.commit_batch(std::slice::from_ref(rec)).await
    }
    /// Every partition of the topic (the spool has one, 0).
    async fn partitions(&mut self) -> Result<Vec<i32>> {
        Ok(vec![0])
    }
    /// Reads exactly `owned` from now on. A partition added starts at the
    /// group's committed offset; a partition dropped has its commits
    /// flushed first (synchronously), so its next reader resumes after
    /// what this one processed. The spool's one partition is always read.
    async fn assign(&mut self, owned: &[i32]) -> Result<()> {
        let _ = owned;
        Ok(())
    }
}

/// How to reach the bus; cheap to clone, makes publishers and subscriptions.
#[derive(Debug, Clone)]
pub enum BusConfig {
    Kafka {
        brokers: String,
        topic_prefix: String,
        group_id: String,
    },
    Spool {
        root: PathBuf,
    },
}

impl BusConfig {
    pub fn publisher(&self) -> Result<SharedPublisher> {
        Ok(match self {
            BusConfig::Kafka {
                brokers,
                topic_prefix,
                ..
            } => Arc::new(KafkaPublisher::new(brokers, topic_prefix)?),
            BusConfig::Spool { root } => Arc::new(SpoolPublisher::new(root)),
        })
    }

    /// A subscription to every partition of `topic` for the consumer group
    /// `{group_id}-{group}`.
    pub async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>> {
        self.subscribe_share(topic, group, Share::ALL).await
    }

    /// A subscription to `share` of `topic`'s partitions for the consumer
    /// group `{group_id}-{group}` (the spool has one partition: any share
    /// reads it).
    pub async fn subscribe_share(
        &self,
        topic: &str,
        group: &str,
        share: Share,
    ) -> Result<Box<dyn Subscription>> {
        Ok(match self {
            BusConfig::Kafka {
                brokers,
                topic_prefix,
                group_id,
            } => Box::new(
                KafkaSubscription::new(
                    brokers,
                    topic_prefix,
                    &format!("{group_id}-{group}"),
                    topic,
                    share,
                )
                .await?,
            ),
            BusConfig::Spool { root } => Box::new(SpoolSubscription::new(root, topic)?),
        })
    }

    /// The consumer group and full topic name of a subscription to `topic`
    /// for `group`: the scope of its partition leases.
    pub fn scope(&self, topic: &str, group: &str) -> (String, String) {
        match self {
            BusConfig::Kafka {
                topic_prefix,
                group_id,
                ..
            } => (
                format!("{group_id}-{group}"),
                format!("{topic_prefix}{topic}"),
            ),
            BusConfig::Spool { root } => (group.to_string(), format!("{}/{topic}", root.display())),
        }
    }

    /// Counts the messages published to a spool topic and not yet committed
    /// (for the embedded mode's "wait until drained"); `None` for Kafka.
    pub fn spool_pending(&self, topic: &str) -> Option<usize> {
        match self {
            BusConfig::Spool { root } => {
                Some(spool_files(&root.join(topic)).map(|f| f.len()).unwrap_or(0))
            }
            BusConfig::Kafka { .. } => None,
        }
    }
}

/// The largest payload copied whole into a dead-letter record; above it the
/// payload is cut and `tickmesh.truncated_from` says how long it was (the
/// original stays in the source topic at the offset the headers name).
pub const DLQ_MAX_PAYLOAD: usize = 900 * 1024;

/// Sends a record that failed validation to `<topic>.dlq`, with headers
/// naming its topic, partition, offset, the error and when
/// (`tickmesh.topic`, `.partition`, `.offset`, `.error`, `.dead_lettered_at`;
/// `.truncated_from` when the payload was cut to [`DLQ_MAX_PAYLOAD`]).
pub async fn dead_letter(publisher: &dyn Publisher, rec: &Record, error: &str) -> Result<()> {
    let mut headers = vec![
        ("tickmesh.topic", rec.topic.clone()),
        ("tickmesh.partition", rec.partition.to_string()),
        ("tickmesh.offset", rec.offset.to_string()),
        ("tickmesh.error", error.chars().take(2000).collect()),
        (
            "tickmesh.dead_lettered_at",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        ),
    ];
    let payload = if rec.payload.len() > DLQ_MAX_PAYLOAD {
        headers.push(("tickmesh.truncated_from", rec.payload.len().to_string()));
        &rec.payload[..DLQ_MAX_PAYLOAD]
    } else {
        &rec.payload[..]
    };
    let key = rec.key.clone().unwrap_or_default();
    publisher
        .publish(
            &tickmesh_core::types::topics::dlq(&rec.topic),
            &key,
            payload,
            &headers,
        )
        .await
}

// ---------------------------------------------------------------- Kafka

/// Creates topics that do not exist yet (never rely on auto-creation).
pub async fn kafka_create_topics(
    brokers: &str,
    prefix: &str,
    topics: &[&str],
    partitions: i32,
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| Error::bus("admin", e))?;
    let names: Vec<String> = topics.iter().map(|t| format!("{prefix}{t}")).collect();
    let new: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(15)));
    let results = admin.create_topics(&new, &opts).await.map_err(|e| {
        Error::bus(
            "admin",
            format!("{e} (is the broker up? scripts/services.sh up starts it at {brokers})"),
        )
    })?;
    for r in results {
        if let Err((topic, code)) = r {
            if code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists {
                return Err(Error::bus(topic, format!("create topic: {code}")));
            }
        }
    }
    Ok(())
}

pub struct KafkaPublisher {
    producer: FutureProducer,
    prefix: String,
}

impl KafkaPublisher {
    pub fn new(brokers: &str, prefix: &str) -> Result<Self> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("message.timeout.ms", "30000")
            .set("message.max.bytes", "20000000")
            .set("acks", "all")
            .create()
            .map_err(|e| Error::bus("producer", e))?;
        Ok(KafkaPublisher {
            producer,
            prefix: prefix.to_string(),
        })
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, String)],
    ) -> Result<()> {
        let name = format!("{}{topic}", self.prefix);
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let rec = FutureRecord::to(&name).key(key).payload(payload).headers(h);
        self.producer
            .send(rec, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| Error::bus(&name, format!("publish: {e}")))?;
        Ok(())
    }
}

/// Which partitions of a topic a subscription starts with: those whose
/// number is `index` modulo `count`. Tools and tests read it all; the
/// ingest consumers start with none and take partitions by lease
/// (`actors/ingest/src/ownership.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub index: usize,
    pub count: usize,
}

impl Share {
    /// Every partition.
    pub const ALL: Share = Share { index: 0, count: 1 };
    /// No partition (until [`Subscription::assign`] gives it some).
    pub const NONE: Share = Share { index: 0, count: 0 };

    pub fn owns(self, partition: i32) -> bool {
        self.count == 1
            || (self.count > 1 && (partition.max(0) as usize) % self.count == self.index)
    }
}

/// Counters of the Kafka consumers of this process (read by `/metrics`).
#[derive(Debug, Default)]
pub struct KafkaStats {
    /// Offsets the broker skipped (a fetch that returned records past the
    /// one asked for): each one started a hunt for the missing records.
    pub gaps: AtomicU64,
    /// Hunts that found the missing records again.
    pub gaps_recovered: AtomicU64,
    /// Gaps that were real: the broker returned the records on both sides
    /// of them in one run (compaction, transaction markers).
    pub gaps_genuine: AtomicU64,
    /// Seeks made while hunting.
    pub seeks: AtomicU64,
    /// Asynchronous offset commits the broker refused (the next commit, or
    /// a redelivery after a restart, covers them).
    pub commit_failures: AtomicU64,
    /// Offset commits sent.
    pub commits: AtomicU64,
}

/// The process's Kafka consumer counters.
pub static KAFKA_STATS: KafkaStats = KafkaStats {
    gaps: AtomicU64::new(0),
    gaps_recovered: AtomicU64::new(0),
    gaps_genuine: AtomicU64::new(0),
    seeks: AtomicU64::new(0),
    commit_failures: AtomicU64::new(0),
    commits: AtomicU64::new(0),
};

/// Adds one to a [`KAFKA_STATS`] counter and to its metric.
fn count(c: &AtomicU64, metric: &'static str) {
    c.fetch_add(1, Ordering::Relaxed);
    metrics::counter!(metric).increment(1);
}

/// Counts refused asynchronous commits.
pub struct CommitCounter;

impl rdkafka::client::ClientContext for CommitCounter {}

impl rdkafka::consumer::ConsumerContext for CommitCounter {
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            count(
                &KAFKA_STATS.commit_failures,
                "tickmesh_kafka_commit_failures_total",
            );
            tracing::warn!(error = %e, offsets = ?offsets.to_topic_map(), "offset commit refused; a later commit covers it");
        }
    }
}

type KafkaConsumer = StreamConsumer<CommitCounter>;

/// How long a partition that is being checked may stay silent before the
/// check looks further back.
const HUNT_STEP: Duration = Duration::from_millis(800);

/// A partition's place in the stream.
#[derive(Debug)]
struct Part {
    /// The next offset to hand out: every record before it was handed out
    /// (or was before the subscription's start).
    next: i64,
    /// The lowest offset the broker holds.
    low: i64,
    /// Set while the subscription is making sure nothing before `next`'s
    /// neighbours is skipped (see [`KafkaSubscription`]).
    hunt: Option<Hunt>,
}

#[derive(Debug)]
struct Hunt {
    /// How far before `next` the last seek went (0: no seek yet).
    back: i64,
    /// A record before `next` arrived since that seek: the broker is
    /// returning the stream from before the gap.
    seen_before: bool,
    since: std::time::Instant,
    /// Started by a skipped offset (not by the check at assignment).
    gap: bool,
}

/// A Kafka subscription with explicit partition assignment and a check of
/// offset continuity.
///
/// - **Assignment**: the subscription assigns itself its [`Share`] of the
///   topic's partitions and starts each at the group's committed offset.
///   It never joins the consumer group's membership protocol: tansu 0.6.0
///   leaves a group STABLE with no members for minutes after a member is
///   killed, and a replacement then consumes nothing. Offsets are still
///   committed under the group id.
/// - **Continuity**: tansu 0.6.0 answers a fetch from an offset inside a
///   record batch with the *next* batch, and a fetch inside the last batch
///   with nothing. A batching producer plus a restart would then skip the
///   records between the committed offset and the end of its batch. So
///   every record's offset is checked against the partition's next offset:
///   a record past it is held back, and the subscription seeks back (1, 8,
///   64, … offsets before) until the broker returns the batch that holds the
///   missing offset; records already handed out are skipped by offset. A
///   partition that starts after its first offset is checked the same way
///   when it stays silent, since the skipped batch may be the last one. A
///   gap the broker returns both sides of in one run is real (compaction,
///   transaction markers on a real Kafka) and is passed. Counted in
///   [`KAFKA_STATS`].
/// - **Commits** are asynchronous and batched: [`Subscription::commit_batch`]
///   sends one commit of each partition's highest offset and returns.
pub struct KafkaSubscription {
    consumer: Arc<KafkaConsumer>,
    brokers: String,
    group: String,
    prefix: String,
    name: String,
    /// Every partition of the topic.
    all: Vec<i32>,
    parts: BTreeMap<i32, Part>,
    committed: BTreeMap<i32, i64>,
    /// When the lag gauges are next measured.
    lag_due: std::time::Instant,
}

/// How long a poll waits for more records once it has one (up to its
/// `max`), so that a batch takes in more than one fetch response.
const BATCH_LINGER: Duration = Duration::from_millis(25);

/// How often a Kafka subscription measures its partitions' lag.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Runs a blocking Kafka client call off the async reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> rdkafka::error::KafkaResult<T> + Send + 'static,
) -> rdkafka::error::KafkaResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(rdkafka::error::KafkaError::Canceled))
}

impl KafkaSubscription {
    pub async fn new(
        brokers: &str,
        prefix: &str,
        group: &str,
        topic: &str,
        share: Share,
    ) -> Result<Self> {
        let name = format!("{prefix}{topic}");
        let consumer: KafkaConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.message.max.bytes", "20000000")
            // tansu 0.6.0 holds every fetch this long, data or not: 100 ms
            // capped a consumer near 30 MB/s, 10 ms lets it read ~450 MB/s.
            .set("fetch.wait.max.ms", "10")
            .set("max.partition.fetch.bytes", "16777216")
            .create_with_context(CommitCounter)
            .map_err(|e| Error::bus(&name, e))?;
        let consumer = Arc::new(consumer);
        let unreachable = |e: rdkafka::error::KafkaError| {
            Error::bus(
                &name,
                format!("{e} (is the broker up? scripts/services.sh up starts it at {brokers})"),
            )
        };
        let (c, n) = (consumer.clone(), name.clone());
        let meta = blocking(move || c.fetch_metadata(Some(&n), Duration::from_secs(15)))
            .await
            .map_err(unreachable)?;
        if meta
            .topics()
            .iter()
            .all(|t| t.name() != name || t.error().is_some())
        {
            return Err(Error::bus(
                &name,
                "the topic does not exist (scripts/services.sh up and `tickmesh admin topics create` create the pipeline's topics)",
            ));
        }
        let all: Vec<i32> = meta
            .topics()
            .iter()
            .filter(|t| t.name() == name && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut sub = KafkaSubscription {
            consumer,
            brokers: brokers.to_string(),
            group: group.to_string(),
            prefix: prefix.to_string(),
            name,
            all: all.clone(),
            parts: BTreeMap::new(),
            committed: BTreeMap::new(),
            lag_due: std::time::Instant::now(),
        };
        let owned: Vec<i32> = all.into_iter().filter(|p| share.owns(*p)).collect();
        sub.assign_partitions(&owned).await?;
        Ok(sub)
    }

    fn unreachable(&self, e: rdkafka::error::KafkaError) -> Error {
        Error::bus(
            &self.name,
            format!(
                "{e} (is the broker up? scripts/services.sh up starts it at {})",
                self.brokers
            ),
        )
    }

    /// Makes `owned` the assigned partitions: see [`Subscription::assign`].
    async fn assign_partitions(&mut self, owned: &[i32]) -> Result<()> {
        let owned: std::collections::BTreeSet<i32> = owned.iter().copied().collect();
        if let Some(p) = owned.iter().find(|p| !self.all.contains(p)) {
            return Err(Error::bus(
                &self.name,
                format!("partition {p} does not exist"),
            ));
        }
        let dropped: Vec<i32> = self
            .parts
            .keys()
            .filter(|p| !owned.contains(p))
            .copied()
            .collect();
        let added: Vec<i32> = owned
            .iter()
            .filter(|p| !self.parts.contains_key(p))
            .copied()
            .collect();
        if dropped.is_empty() && added.is_empty() && !self.parts.is_empty() {
            return Ok(());
        }
        // The next reader of a dropped partition starts at its committed
        // offset: make sure this one's last commit has landed.
        let mut flush = TopicPartitionList::new();
        for p in &dropped {
            if let Some(o) = self.committed.get(p) {
                flush
                    .add_partition_offset(&self.name, *p, Offset::Offset(*o))
                    .map_err(|e| Error::bus(&self.name, e))?;
            }
        }
        if flush.count() > 0 {
            let c = self.consumer.clone();
            blocking(move || c.commit(&flush, CommitMode::Sync))
                .await
                .map_err(|e| Error::bus(&self.name, format!("commit before release: {e}")))?;
        }
        for p in &dropped {
            self.parts.remove(p);
            self.committed.remove(p);
            // Whoever reads it now reports its lag.
            metrics::gauge!("tickmesh_ingest_consumer_lag", "topic" => self.name.clone(), "partition" => p.to_string()).set(0.0);
        }
        let mut tpl = TopicPartitionList::new();
        for p in &added {
            tpl.add_partition(&self.name, *p);
        }
        let c = self.consumer.clone();
        let committed = blocking(move || c.committed_offsets(tpl, Duration::from_secs(15)))
            .await
            .map_err(|e| self.unreachable(e))?
            .to_topic_map();
        for p in added {
            let (c, n) = (self.consumer.clone(), self.name.clone());
            let (low, _high) = blocking(move || c.fetch_watermarks(&n, p, Duration::from_secs(15)))
                .await
                .map_err(|e| self.unreachable(e))?;
            let next = match committed.get(&(self.name.clone(), p)) {
                Some(Offset::Offset(o)) if *o >= low => *o,
                _ => low,
            };
            // A start after the first offset may sit inside the last batch,
            // which tansu answers with nothing: check it when it stays silent.
            let hunt = (next > low).then(|| Hunt {
                back: 0,
                seen_before: false,
                since: std::time::Instant::now(),
                gap: false,
            });
            self.parts.insert(p, Part { next, low, hunt });
        }
        // Kept partitions go on from where they are: records fetched twice
        // are skipped by offset.
        let mut start = TopicPartitionList::new();
        for (p, part) in &self.parts {
            start
                .add_partition_offset(&self.name, *p, Offset::Offset(part.next))
                .map_err(|e| Error::bus(&self.name, e))?;
        }
        self.consumer
            .assign(&start)
            .map_err(|e| Error::bus(&self.name, e))?;
        tracing::info!(topic = %self.name, group = %self.group, partitions = ?self.parts.keys().collect::<Vec<_>>(), starts = ?self.parts.iter().map(|(p, s)| (*p, s.next)).collect::<Vec<_>>(), "kafka subscription assigned");
        Ok(())
    }

    /// Measures each partition's lag (high watermark minus the next offset
    /// to hand out) into `tickmesh_ingest_consumer_lag`, every
    /// [`LAG_EVERY`], off the reactor.
    fn measure_lag(&mut self) {
        let now = std::time::Instant::now();
        if now < self.lag_due {
            return;
        }
        self.lag_due = now + LAG_EVERY;
        let at: Vec<(i32, i64)> = self.parts.iter().map(|(p, s)| (*p, s.next)).collect();
        let (c, name) = (self.consumer.clone(), self.name.clone());
        tokio::task::spawn_blocking(move || {
            for (p, next) in at {
                match c.fetch_watermarks(&name, p, Duration::from_secs(5)) {
                    Ok((_, high)) => metrics::gauge!("tickmesh_ingest_consumer_lag", "topic" => name.clone(), "partition" => p.to_string())
                        .set((high - next).max(0) as f64),
                    Err(e) => tracing::debug!(topic = %name, partition = p, error = %e, "lag not measured"),
                }
            }
        });
    }

    /// Seeks partition `p` further back for its next offset.
    fn hunt_further(&mut self, p: i32, gap: bool) {
        let Some(part) = self.parts.get_mut(&p) else {
            return;
        };
        let (back, was_gap, at_low) = match &part.hunt {
            Some(h) => (
                h.back,
                h.gap || gap,
                h.back > 0 && part.next - h.back <= part.low,
            ),
            None => (0, gap, false),
        };
        if at_low {
            // Already back at the first offset the broker holds.
            if was_gap {
                count(
                    &KAFKA_STATS.gaps_genuine,
                    "tickmesh_kafka_gaps_genuine_total",
                );
                tracing::warn!(topic = %self.name, partition = p, next = part.next, "offsets missing all the way back to the partition's first: passed as a real gap");
            }
            part.hunt = None;
            return;
        }
        let back = if back == 0 { 1 } else { back * 8 };
        let target = (part.next - back).max(part.low);
        part.hunt = Some(Hunt {
            back: part.next - target,
            seen_before: false,
            since: std::time::Instant::now(),
            gap: was_gap,
        });
        count(&KAFKA_STATS.seeks, "tickmesh_kafka_seeks_total");
        if let Err(e) = self
            .consumer
            .seek(&self.name, p, Offset::Offset(target), Duration::ZERO)
        {
            tracing::warn!(topic = %self.name, partition = p, target, error = %e, "seek failed; retried on the next step");
        }
    }

    /// Escalates hunts whose partition stayed silent for a step.
    fn step_hunts(&mut self) {
        let due: Vec<(i32, bool)> = self
            .parts
            .iter()
            .filter_map(|(p, s)| {
                let h = s.hunt.as_ref()?;
                (h.since.elapsed() >= HUNT_STEP).then_some((*p, h.seen_before))
            })
            .collect();
        for (p, seen_before) in due {
            if seen_before {
                // The broker returned what precedes `next` and then nothing:
                // the partition is caught up.
                if let Some(part) = self.parts.get_mut(&p) {
                    if part.hunt.take().is_some_and(|h| h.gap) {
                        count(
                            &KAFKA_STATS.gaps_recovered,
                            "tickmesh_kafka_gaps_recovered_total",
                        );
                    }
                }
            } else {
                self.hunt_further(p, false);
            }
        }
    }

    /// Checks a record against its partition's next offset: `Some` when it
    /// is the next one (or a real gap was crossed), `None` when it is held
    /// back or was handed out before.
    fn admit(&mut self, p: i32, offset: i64) -> bool {
        let Some(part) = self.parts.get_mut(&p) else {
            return false; // not ours (assignment changed)
        };
        if offset < part.next {
            if let Some(h) = part.hunt.as_mut() {
                h.seen_before = true;
            }
            return false;
        }
        if offset == part.next {
            if part.hunt.take().is_some_and(|h| h.gap) {
                count(
                    &KAFKA_STATS.gaps_recovered,
                    "tickmesh_kafka_gaps_recovered_total",
                );
            }
            part.next = offset + 1;
            return true;
        }
        match &part.hunt {
            Some(h) if h.seen_before => {
                // Both sides of the gap in one run: nothing is there.
                count(
                    &KAFKA_STATS.gaps_genuine,
                    "tickmesh_kafka_gaps_genuine_total",
                );
                tracing::info!(topic = %self.name, partition = p, from = part.next, to = offset, "offsets not in the log (compaction or transaction markers)");
                part.hunt = None;
                part.next = offset + 1;
                true
            }
            Some(h) => {
                if !h.gap {
                    // The check at assignment caught the broker skipping.
                    count(&KAFKA_STATS.gaps, "tickmesh_kafka_gaps_total");
                    tracing::warn!(topic = %self.name, partition = p, expected = part.next, got = offset, "the broker skipped offsets; seeking back for them");
                }
                self.hunt_further(p, true);
                false
            }
            None => {
                count(&KAFKA_STATS.gaps, "tickmesh_kafka_gaps_total");
                tracing::warn!(topic = %self.name, partition = p, expected = part.next, got = offset, "the broker skipped offsets; seeking back for them");
                self.hunt_further(p, true);
                false
            }
        }
    }

    fn record(&self, msg: &rdkafka::message::BorrowedMessage<'_>) -> Record {
        let mut headers = BTreeMap::new();
        if let Some(h) = msg.headers() {
            for hd in h.iter() {
                if let Some(v) = hd.value {
                    headers.insert(hd.key.to_string(), String::from_utf8_lossy(v).into_owned());
                }
            }
        }
        let topic = msg.topic();
        Record {
            topic: topic
                .strip_prefix(&self.prefix)
                .unwrap_or(topic)
                .to_string(),
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            payload: msg.payload().unwrap_or_default().to_vec(),
            headers,
            origin: None,
        }
    }

    /// Each assigned partition's high watermark (the offset its next record
    /// will get), straight from the broker.
    pub async fn high_watermarks(&self) -> Result<BTreeMap<i32, i64>> {
        let mut out = BTreeMap::new();
        for p in self.parts.keys().copied() {
            let (c, n) = (self.consumer.clone(), self.name.clone());
            let (_, high) = blocking(move || c.fetch_watermarks(&n, p, Duration::from_secs(15)))
                .await
                .map_err(|e| self.unreachable(e))?;
            out.insert(p, high);
        }
        Ok(out)
    }

    /// The offsets committed for this subscription's group (a round trip to
    /// the broker): what a restart would resume from.
    pub async fn committed_offsets(&self) -> Result<BTreeMap<i32, i64>> {
        let mut tpl = TopicPartitionList::new();
        for p in self.parts.keys() {
            tpl.add_partition(&self.name, *p);
        }
        let c = self.consumer.clone();
        let map = blocking(move || c.committed_offsets(tpl, Duration::from_secs(15)))
            .await
            .map_err(|e| Error::bus(&self.name, e))?
            .to_topic_map();
        Ok(map
            .into_iter()
            .filter_map(|((_, p), o)| match o {
                Offset::Offset(o) => Some((p, o)),
                _ => None,
            })
            .collect())
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>> {
        use futures::FutureExt;
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        let mut linger = None;
        self.measure_lag();
        loop {
            self.step_hunts();
            let consumer = self.consumer.clone();
            let got = if out.is_empty() {
                let now = tokio::time::Instant::now();
                if now >= deadline {
                    break;
                }
                let slice = (deadline - now).min(Duration::from_millis(200));
                match tokio::time::timeout(slice, consumer.recv()).await {
                    Err(_) => continue,
                    Ok(r) => r,
                }
            } else {
                match consumer.recv().now_or_never() {
                    Some(r) => r,
                    None => {
                        // Linger a moment for the rest of a fetch: larger
                        // batches write more objects at once.
                        let now = tokio::time::Instant::now();
                        let until = *linger.get_or_insert(now + BATCH_LINGER);
                        if now >= until {
                            break;
                        }
                        match tokio::time::timeout(until - now, consumer.recv()).await {
                            Err(_) => break,
                            Ok(r) => r,
                        }
                    }
                }
            };
            let msg = got.map_err(|e| Error::bus(&self.name, e))?;
            if self.admit(msg.partition(), msg.offset()) {
                out.push(self.record(&msg));
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn commit_batch(&mut self, recs: &[Record]) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        let mut high: BTreeMap<i32, i64> = BTreeMap::new();
        for r in recs {
            let e = high.entry(r.partition).or_insert(r.offset);
            *e = (*e).max(r.offset);
        }
        for (p, o) in high {
            if self.committed.get(&p).is_some_and(|c| *c > o) {
                continue;
            }
            self.committed.insert(p, o + 1);
            tpl.add_partition_offset(&self.name, p, Offset::Offset(o + 1))
                .map_err(|e| Error::bus(&self.name, e))?;
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        count(&KAFKA_STATS.commits, "tickmesh_kafka_commits_total");
        self.consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(|e| Error::bus(&self.name, format!("commit: {e}")))
    }

    async fn partitions(&mut self) -> Result<Vec<i32>> {
        Ok(self.all.clone())
    }

    async fn assign(&mut self, owned: &[i32]) -> Result<()> {
        self.assign_partitions(owned).await
    }
}

// ---------------------------------------------------------------- spool

fn spool_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with(".headers.json") || !e.file_type()?.is_file() {
            continue;
        }
        out.push(e.path());
    }
    out.sort();
    Ok(out)
}

fn headers_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".headers.json");
    PathBuf::from(s)
}

pub struct SpoolPublisher {
    root: PathBuf,
    seq: AtomicU64,
}

impl SpoolPublisher {
    pub fn new(root: &Path) -> Self {
        SpoolPublisher {
            root: root.to_path_buf(),
            seq: AtomicU64::new(0),
        }
    }
}

fn safe_key(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect()
}

#[async_trait]
impl Publisher for SpoolPublisher {
    async fn publish(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: &[(&str, String)],
    ) -> Result<()> {
        let dir = self.root.join(topic);
        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{now:020}-{seq:06}-{}.json", safe_key(key));
        let path = dir.join(&name);
        let payload = payload.to_vec();
        let headers: BTreeMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&dir)?;
            if !headers.is_empty() {
                let h = serde_json::to_vec_pretty(&headers).map_err(std::io::Error::other)?;
                std::fs::write(headers_path(&path), h)?;
            }
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, &payload)?;
            std::fs::rename(&tmp, &path)
        })
        .await
        .expect("spool publish panicked")
        .map_err(|e| Error::bus(topic, format!("spool write: {e}")))
    }
}

/// Watches a spool folder (inotify on Linux): any change but a read wakes
/// `wake`. `None`, logged, when it cannot be watched: the folder is then
/// listed every 100 ms.
fn watch_folder(dir: &Path, wake: Arc<tokio::sync::Notify>) -> Option<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // An error (an overflowed queue) wakes the reader too: it lists.
        if !matches!(ev, Ok(ref e) if matches!(e.kind, EventKind::Access(_))) {
            wake.notify_one();
        }
    });
    match watcher.and_then(|mut w| w.watch(dir, RecursiveMode::NonRecursive).map(|_| w)) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the spool folder; listing it every 100 ms instead");
            None
        }
    }
}

/// How many committed spool files `.done/` keeps (the oldest go first).
pub const SPOOL_DONE_KEEP: usize = 1000;

/// How often a watched spool folder is listed anyway (a watcher can miss
/// events when the kernel's queue overflows); an unwatched one is listed
/// every 100 ms.
const SPOOL_RESCAN: Duration = Duration::from_secs(2);

pub struct SpoolSubscription {
    topic: String,
    dir: PathBuf,
    done: PathBuf,
    /// Woken by the folder's watcher when something lands in it.
    wake: Arc<tokio::sync::Notify>,
    watcher: Option<notify::RecommendedWatcher>,
    /// Files listed and not yet handed out, oldest first.
    pending: std::collections::VecDeque<PathBuf>,
    in_flight: HashSet<PathBuf>,
    next_offset: i64,
    commits: u64,
}

impl SpoolSubscription {
    pub fn new(root: &Path, topic: &str) -> Result<Self> {
        let dir = root.join(topic);
        let done = dir.join(".done");
        std::fs::create_dir_all(&done).map_err(|e| Error::io(&done, e))?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let watcher = watch_folder(&dir, wake.clone());
        Ok(SpoolSubscription {
            topic: topic.to_string(),
            dir,
            done,
            wake,
            watcher,
            pending: Default::default(),
            in_flight: HashSet::new(),
            next_offset: 0,
            commits: 0,
        })
    }

    /// Whether the folder is watched (else listed every 100 ms).
    pub fn watching(&self) -> bool {
        self.watcher.is_some()
    }

    /// Lists the folder off the reactor.
    async fn refill(&mut self) -> Result<()> {
        let dir = self.dir.clone();
        let files = tokio::task::spawn_blocking(move || spool_files(&dir))
            .await
            .map_err(|e| Error::bus(&self.topic, format!("spool listing: {e}")))?
            .map_err(|e| Error::io(&self.dir, e))?;
        self.pending = files
            .into_iter()
            .filter(|p| !self.in_flight.contains(p))
            .collect();
        metrics::gauge!("tickmesh_ingest_consumer_lag", "topic" => self.topic.clone(), "partition" => "0")
            .set(self.pending.len() as f64);
        Ok(())
    }

    async fn read(&mut self, path: PathBuf) -> Result<Option<Record>> {
        let payload = match tokio::fs::read(&path).await {
            Ok(p) => p,
            // Taken by another reader of the folder meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let headers = match tokio::fs::read(headers_path(&path)).await {
            Ok(h) => serde_json::from_slice(&h).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        let key = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .and_then(|n| {
                n.splitn(3, '-')
                    .nth(2)
                    .map(|k| k.trim_end_matches(".json").to_string())
            });
        self.in_flight.insert(path.clone());
        let offset = self.next_offset;
        self.next_offset += 1;
        Ok(Some(Record {
            topic: self.topic.clone(),
            partition: 0,
            offset,
            key,
            payload,
            headers,
            origin: Some(path),
        }))
    }

    /// Keeps the newest [`SPOOL_DONE_KEEP`] files of `.done/`.
    async fn prune_done(&self) {
        let done = self.done.clone();
        let _ = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut files = spool_files(&done)?;
            if files.len() <= SPOOL_DONE_KEEP {
                return Ok(());
            }
            let extra = files.len() - SPOOL_DONE_KEEP;
            for f in files.drain(..extra) {
                let _ = std::fs::remove_file(headers_path(&f));
                std::fs::remove_file(&f)?;
            }
            Ok(())
        })
        .await;
    }
}

#[async_trait]
impl Subscription for SpoolSubscription {
    async fn poll_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        loop {
            if self.pending.is_empty() {
                self.refill().await?;
            }
            while out.len() < max {
                let Some(path) = self.pending.pop_front() else {
                    break;
                };
                if let Some(rec) = self.read(path).await? {
                    out.push(rec);
                }
            }
            let now = tokio::time::Instant::now();
            if !out.is_empty() || now >= deadline {
                return Ok(out);
            }
            let nap = match self.watcher {
                Some(_) => SPOOL_RESCAN,
                None => Duration::from_millis(100),
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until((now + nap).min(deadline)) => {}
            }
        }
    }

    async fn commit_batch(&mut self, recs: &[Record]) -> Result<()> {
        for rec in recs {
            let Some(path) = &rec.origin else {
                return Err(Error::bus(
                    &self.topic,
                    "commit of a record not from this spool",
                ));
            };
            let name = path.file_name().expect("spool files have names");
            let target = self.done.join(name);
            tokio::fs::rename(path, &target)
                .await
                .map_err(|e| Error::io(path, e))?;
            let hp = headers_path(path);
            if tokio::fs::try_exists(&hp).await.unwrap_or(false) {
                let _ = tokio::fs::rename(&hp, headers_path(&target)).await;
            }
            self.in_flight.remove(path);
            self.commits += 1;
            if self.commits.is_multiple_of(200) {
                self.prune_done().await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn spool_delivers_in_order_and_redelivers_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let p = SpoolPublisher::new(dir.path());
        p.publish("t", "AAPL", b"one", &[("h", "v".into())])
            .await
            .unwrap();
        p.publish("t", "MSFT", b"two", &[]).await.unwrap();
        let mut s = SpoolSubscription::new(dir.path(), "t").unwrap();
        let a = s.poll(Duration::from_millis(10)).await.unwrap().unwrap();
        let b = s.poll(Duration::from_millis(10)).await.unwrap().unwrap();
        assert_eq!(
            (a.payload.as_slice(), b.payload.as_slice()),
            (&b"one"[..], &b"two"[..])
        );
        assert_eq!(a.key.as_deref(), Some("AAPL"));
        assert_eq!(a.headers.get("h").map(String::as_str), Some("v"));
        assert!(s.poll(Duration::from_millis(10)).await.unwrap().is_none());
        s.commit(&a).await.unwrap();
        // A new subscription (a restart) sees only the uncommitted one.
        let mut s2 = SpoolSubscription::new(dir.path(), "t").unwrap();
        let again = s2.poll(Duration::from_millis(10)).await.unwrap().unwrap();
        assert_eq!(again.payload, b"two");
        let cfg = BusConfig::Spool {
            root: dir.path().to_path_buf(),
        };
        assert_eq!(cfg.spool_pending("t"), Some(1));
    }

    #[tokio::test]
    async fn a_waiting_spool_reader_is_woken_by_its_folder_watcher() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SpoolSubscription::new(dir.path(), "t").unwrap();
        assert!(s.watching(), "inotify is available here");
        let p = SpoolPublisher::new(dir.path());
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            p.publish("t", "AAPL", b"late", &[]).await.unwrap();
        });
        // Listing finds nothing; the next listing without the watcher would
        // be SPOOL_RESCAN (2 s) later. Woken by the event it returns well
        // before that.
        let started = std::time::Instant::now();
        let rec = s.poll(Duration::from_secs(30)).await.unwrap().unwrap();
        let took = started.elapsed();
        late.await.unwrap();
        assert_eq!(rec.payload, b"late");
        assert!(
            took < SPOOL_RESCAN,
            "the reader waited {took:?}: it was not woken by the watcher"
        );
    }

    #[tokio::test]
    async fn spool_done_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = SpoolPublisher::new(dir.path());
        let n = SPOOL_DONE_KEEP + 200;
        for i in 0..n {
            p.publish("t", "K", format!("{i}").as_bytes(), &[])
                .await
                .unwrap();
        }
        let mut s = SpoolSubscription::new(dir.path(), "t").unwrap();
        let mut seen = 0;
        loop {
            let batch = s.poll_batch(100, Duration::from_millis(10)).await.unwrap();
            if batch.is_empty() {
                break;
            }
            seen += batch.len();
            s.commit_batch(&batch).await.unwrap();
        }
        assert_eq!(seen, n);
        let done = spool_files(&dir.path().join("t/.done")).unwrap();
        assert_eq!(done.len(), SPOOL_DONE_KEEP);
        // The oldest 200 went; the newest is still there.
        let newest = std::fs::read_to_string(done.last().unwrap()).unwrap();
        assert_eq!(newest, format!("{}", n - 1));
        let oldest = std::fs::read_to_string(&done[0]).unwrap();
        assert_eq!(oldest, "200");
    }
}
