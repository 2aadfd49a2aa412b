//! The message bus: Kafka (distributed) or a file spool (embedded).
//!
//! Both adapters give at-least-once delivery with explicit commits: a record
//! handed out by [`Subscription::poll`] is delivered again after a restart
//! unless [`Subscription::commit`] was called for it. Topic names given to
//! these types are the logical names of [`crate::types::topics`]; a
//! configured prefix is added by the Kafka adapter.
//!
//! The spool keeps one directory per topic under its root (`data/raw/` in
//! the embedded mode). A message is one file whose content is the payload
//! (so a person can drop a JSON file there); optional headers sit beside it
//! in `NAME.headers.json`. Committing moves the file into `.done/`.

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

use crate::{Error, Result};

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
    /// Waits up to `wait` for the next record.
    async fn poll(&mut self, wait: Duration) -> Result<Option<Record>>;
    /// Marks `rec` (and everything before it on its partition) as processed.
    async fn commit(&mut self, rec: &Record) -> Result<()>;
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

    /// A subscription to `topic` for the consumer group `{group_id}-{group}`.
    pub fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>> {
        Ok(match self {
            BusConfig::Kafka {
                brokers,
                topic_prefix,
                group_id,
            } => Box::new(KafkaSubscription::new(
                brokers,
                topic_prefix,
                &format!("{group_id}-{group}"),
                topic,
            )?),
            BusConfig::Spool { root } => Box::new(SpoolSubscription::new(root, topic)?),
        })
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
/// naming its topic, partition, offset and the error.
pub async fn dead_letter(publisher: &dyn Publisher, rec: &Record, error: &str) -> Result<()> {
    let mut headers = vec![
        ("tickmesh.topic", rec.topic.clone()),
        ("tickmesh.partition", rec.partition.to_string()),
        ("tickmesh.offset", rec.offset.to_string()),
        ("tickmesh.error", error.chars().take(2000).collect()),
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
            &crate::types::topics::dlq(&rec.topic),
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

pub struct KafkaSubscription {
    consumer: StreamConsumer,
    prefix: String,
}

impl KafkaSubscription {
    pub fn new(brokers: &str, prefix: &str, group: &str, topic: &str) -> Result<Self> {
        let name = format!("{prefix}{topic}");
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            .set("fetch.message.max.bytes", "20000000")
            .create()
            .map_err(|e| Error::bus(&name, e))?;
        consumer
            .subscribe(&[&name])
            .map_err(|e| Error::bus(&name, e))?;
        Ok(KafkaSubscription {
            consumer,
            prefix: prefix.to_string(),
        })
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn poll(&mut self, wait: Duration) -> Result<Option<Record>> {
        let msg = match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => return Ok(None),
            Ok(Err(e)) => return Err(Error::bus("consumer", e)),
            Ok(Ok(m)) => m,
        };
        let mut headers = BTreeMap::new();
        if let Some(h) = msg.headers() {
            for hd in h.iter() {
                if let Some(v) = hd.value {
                    headers.insert(hd.key.to_string(), String::from_utf8_lossy(v).into_owned());
                }
            }
        }
        let topic = msg.topic();
        Ok(Some(Record {
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
        }))
    }

    async fn commit(&mut self, rec: &Record) -> Result<()> {
        let name = format!("{}{}", self.prefix, rec.topic);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&name, rec.partition, Offset::Offset(rec.offset + 1))
            .map_err(|e| Error::bus(&name, e))?;
        let consumer = &self.consumer;
        tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync))
            .map_err(|e| Error::bus(&name, format!("commit offset {}: {e}", rec.offset)))
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

pub struct SpoolSubscription {
    topic: String,
    dir: PathBuf,
    done: PathBuf,
    in_flight: HashSet<PathBuf>,
    next_offset: i64,
}

impl SpoolSubscription {
    pub fn new(root: &Path, topic: &str) -> Result<Self> {
        let dir = root.join(topic);
        let done = dir.join(".done");
        std::fs::create_dir_all(&done).map_err(|e| Error::io(&done, e))?;
        Ok(SpoolSubscription {
            topic: topic.to_string(),
            dir,
            done,
            in_flight: HashSet::new(),
            next_offset: 0,
        })
    }
}

#[async_trait]
impl Subscription for SpoolSubscription {
    async fn poll(&mut self, wait: Duration) -> Result<Option<Record>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let files = spool_files(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
            if let Some(path) = files.into_iter().find(|p| !self.in_flight.contains(p)) {
                let payload = tokio::fs::read(&path)
                    .await
                    .map_err(|e| Error::io(&path, e))?;
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
                return Ok(Some(Record {
                    topic: self.topic.clone(),
                    partition: 0,
                    offset,
                    key,
                    payload,
                    headers,
                    origin: Some(path),
                }));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100).min(wait)).await;
        }
    }

    async fn commit(&mut self, rec: &Record) -> Result<()> {
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
        if hp.exists() {
            let _ = tokio::fs::rename(&hp, headers_path(&target)).await;
        }
        self.in_flight.remove(path);
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
}
