//! `ConsumerActor<S>`: one source's consumer. It receives batches of
//! records from the bus (`h_alpaca`/`live_bars` for bars, `h_macrodata`,
//! `h_company`), parses and validates each record into rows of deterministic
//! objects, merges each object once per batch into the object store, and
//! only then commits the batch's offsets.
//!
//! - **Exactly-once output from at-least-once delivery.** Object keys come
//!   from the data (ticker-week, series-year, symbol-year); a write reads the
//!   object with its version tag, merges the new rows in (deduplicated by
//!   timestamp, the later delivery wins) and writes it back only if the
//!   object is still at that version ([`ObjectStore::put_if`]). A writer that
//!   lost the race reads and merges again, so concurrent writers (a
//!   consumer that lost its partitions but keeps writing, the live path,
//!   two producers' consumers) never lose each other's rows. Writers of
//!   one process also take a per-object lock first.
//! - **Batches.** Up to `ingest.batch_records` records per poll; each object
//!   they touch is written once, `ingest.write_concurrency` objects at a
//!   time; then one asynchronous commit per batch.
//! - **Bad input** (bad JSON, a missing field, a wrong type, a bad value, a
//!   payload over `ingest.max_message_bytes`, a panic while a record is
//!   parsed) goes to `<topic>.dlq` with headers naming its topic,
//!   partition, offset and reason, and the consumer goes on. A record that
//!   cannot be written (the store is down) is not committed: the actor
//!   fails, its supervisor restarts it and the batch is delivered again.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tickmesh_core::config::IngestConfig;
use tickmesh_core::types::topics;
use tickmesh_core::{Error, Result};
use tickmesh_io::bus::{dead_letter, BusConfig, Record, Share, SharedPublisher, Subscription};
use tickmesh_io::store::ObjectStore;
use tracing::{debug, warn};

use crate::metrics::IngestMetrics;
use crate::ownership::{LeaseArgs, Ownership};

/// What one source's consumer does with a payload.
pub trait Source: Send + Sync + 'static {
    /// For logs and metrics: `bars`, `macro`, `company`.
    const NAME: &'static str;
    /// The bucket its objects go to.
    const BUCKET: &'static str;
    /// One parsed, validated row.
    type Row: Clone + Send + Sync + 'static;
    /// Parses and validates a payload into rows grouped by object key.
    fn parse(payload: &[u8]) -> Result<Objects<Self>>;
    /// Merges `new` into the object's current content (`None`: a new
    /// object), one row per timestamp with `new` winning, and encodes it.
    fn merge(key: &str, old: Option<Bytes>, new: &[Self::Row]) -> Result<Bytes>;
    /// The time a row carries, for the ingest watermark of its object's
    /// first folder (a ticker's bars); `None`: the source keeps none.
    fn row_time(_row: &Self::Row) -> Option<chrono::DateTime<chrono::Utc>> {
        None
    }
}

/// Rows grouped by the object key they go to.
pub type Objects<S> = Vec<(String, Vec<<S as Source>::Row>)>;

pub struct ConsumerActor<S>(PhantomData<fn() -> S>);

impl<S> Clone for ConsumerActor<S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for ConsumerActor<S> {}

impl<S> Default for ConsumerActor<S> {
    fn default() -> Self {
        ConsumerActor(PhantomData)
    }
}

/// Messages of [`ConsumerActor`].
#[derive(Debug)]
pub enum ConsumerMsg {
    /// Take the next batch from the bus (the actor sends this to itself).
    Poll,
}

impl ractor::Message for ConsumerMsg {}

#[derive(Clone)]
pub struct ConsumerArgs {
    pub bus: BusConfig,
    /// The topic read (`h_alpaca`, `live_bars`, `h_macrodata`, `h_company`).
    pub topic: String,
    /// Consumer group suffix.
    pub group: String,
    /// The partitions read: `Some` takes them by lease with the other
    /// ingest nodes (a cluster), `None` reads them all (one process).
    pub leases: Option<LeaseArgs>,
    pub store: Arc<dyn ObjectStore>,
    /// Where the ingest watermarks go (`Db::advance_watermarks`).
    pub db: tickmesh_io::db::Db,
    pub publisher: SharedPublisher,
    pub metrics: IngestMetrics,
    pub config: IngestConfig,
}

pub struct ConsumerState<S: Source> {
    sub: Box<dyn Subscription>,
    args: ConsumerArgs,
    ownership: Option<Ownership>,
    /// The next batch, polled and parsed while the last one was written.
    next: Option<Prepared<S>>,
}

/// A batch of records with each one's parse outcome, in the same order.
pub struct Prepared<S: Source> {
    batch: Arc<Vec<Record>>,
    parsed: Vec<std::result::Result<Objects<S>, String>>,
}

/// Polls a batch and parses it.
async fn poll_prepared<S: Source>(
    sub: &mut dyn Subscription,
    config: &IngestConfig,
) -> Result<Prepared<S>> {
    let batch = Arc::new(
        sub.poll_batch(config.batch_records, Duration::from_millis(500))
            .await?,
    );
    let parsed = if batch.is_empty() {
        Vec::new()
    } else {
        parse_all::<S>(batch.clone(), config.max_message_bytes).await?
    };
    Ok(Prepared { batch, parsed })
}

impl<S: Source> Actor for ConsumerActor<S> {
    type Msg = ConsumerMsg;
    type State = ConsumerState<S>;
    type Arguments = ConsumerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let share = match args.leases {
            Some(_) => Share::NONE,
            None => Share::ALL,
        };
        let mut sub = args
            .bus
            .subscribe_share(&args.topic, &args.group, share)
            .await?;
        let mut ownership = args.leases.clone().map(|l| {
            let (group, topic) = args.bus.scope(&args.topic, &args.group);
            Ownership::new(l, &group, &topic)
        });
        if let Some(o) = ownership.as_mut() {
            o.round(sub.as_mut()).await?;
        }
        tracing::info!(topic = %args.topic, source = S::NAME, partitions = ?ownership.as_ref().map(|o| o.owned().to_vec()), "consumer started");
        myself.cast(ConsumerMsg::Poll)?;
        Ok(ConsumerState {
            sub,
            args,
            ownership,
            next: None,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(o) = state.ownership.as_mut() {
            match tokio::time::timeout(Duration::from_secs(10), o.leave(state.sub.as_mut())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(topic = %state.args.topic, error = %e, "giving the partition leases back failed; they expire on their own")
                }
                Err(_) => {
                    warn!(topic = %state.args.topic, "giving the partition leases back took over 10 s; they expire on their own")
                }
            }
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ConsumerMsg::Poll => {
                if let Some(o) = state.ownership.as_mut().filter(|o| o.due()) {
                    if o.round(state.sub.as_mut()).await? && state.next.take().is_some() {
                        // The batch read ahead may hold records of partitions
                        // given up: drop it and read the kept ones again from
                        // their committed offsets.
                        o.reset(state.sub.as_mut()).await?;
                        o.round(state.sub.as_mut()).await?;
                    }
                }
                let current = match state.next.take() {
                    Some(p) => p,
                    None => poll_prepared::<S>(state.sub.as_mut(), &state.args.config).await?,
                };
                let leased = |o: &Option<Ownership>| o.as_ref().is_none_or(|o| o.valid());
                if current.batch.is_empty() {
                    // Nothing arrived.
                } else if !leased(&state.ownership) {
                    // The leases may have moved on: the batch is left to
                    // whoever owns its partitions now.
                    warn!(topic = %state.args.topic, records = current.batch.len(), "partition leases not renewed in time: the batch is dropped, not written");
                    // Read its partitions again from the committed offsets
                    // if the next round keeps them.
                    if let Some(o) = state.ownership.as_mut() {
                        o.reset(state.sub.as_mut()).await?;
                    }
                } else {
                    // Write this batch while the next one is polled and parsed.
                    let (written, next) = tokio::join!(
                        apply_batch::<S>(&state.args, &current.batch, current.parsed),
                        poll_prepared::<S>(state.sub.as_mut(), &state.args.config)
                    );
                    written?;
                    let next = next?;
                    if let Some(ms) = std::env::var(FAILPOINT_PAUSE)
                        .ok()
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        tracing::info!(ms, "failpoint: batch written, pausing before its commit");
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    if leased(&state.ownership) {
                        state.sub.commit_batch(&current.batch).await?;
                    } else {
                        warn!(topic = %state.args.topic, records = current.batch.len(), "partition leases ran out while the batch was written: not committed (it is delivered again)");
                    }
                    if !next.batch.is_empty() {
                        state.next = Some(next);
                    }
                }
                myself.cast(ConsumerMsg::Poll)?;
            }
        }
        Ok(())
    }
}

/// Test hook: a record whose key is this value panics while it is parsed
/// (`TICKMESH_FAILPOINT_PANIC_KEY`).
const FAILPOINT: &str = "TICKMESH_FAILPOINT_PANIC_KEY";

/// Test hook: pause this many ms between a batch's writes and its commit,
/// so a test can kill the process there (`TICKMESH_FAILPOINT_PAUSE_BEFORE_COMMIT_MS`).
const FAILPOINT_PAUSE: &str = "TICKMESH_FAILPOINT_PAUSE_BEFORE_COMMIT_MS";

/// Parses one record; `Err(reason)` when it is bad, a panic included.
fn parse_guarded<S: Source>(rec: &Record, limit: usize) -> std::result::Result<Objects<S>, String> {
    if rec.payload.len() > limit {
        return Err(format!(
            "payload of {} bytes exceeds ingest.max_message_bytes = {limit}",
            rec.payload.len()
        ));
    }
    let outcome = std::panic::catch_unwind(|| {
        if rec.key.is_some() && std::env::var(FAILPOINT).ok() == rec.key {
            panic!("failpoint {FAILPOINT}={}", rec.key.as_deref().unwrap_or(""));
        }
        S::parse(&rec.payload)
    });
    match outcome {
        Ok(Ok(groups)) => Ok(groups),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(format!("processing the message panicked: {what}"))
        }
    }
}

/// Parses a batch's records on every core (off the reactor), in order.
async fn parse_all<S: Source>(
    batch: Arc<Vec<Record>>,
    limit: usize,
) -> Result<Vec<std::result::Result<Objects<S>, String>>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(batch.len().max(1));
    tokio::task::spawn_blocking(move || {
        let chunk = batch.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let parts: Vec<_> = batch
                .chunks(chunk)
                .map(|recs| {
                    scope.spawn(move || {
                        recs.iter()
                            .map(|r| parse_guarded::<S>(r, limit))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|h| h.join().expect("parse_guarded catches panics"))
                .collect()
        })
    })
    .await
    .map_err(|e| Error::invalid("parse", format!("the parsing task failed: {e}")))
}

/// Processes one parsed batch (`parsed[i]` is `batch[i]`'s outcome):
/// dead-letters the bad records, writes each object the good ones touch
/// once. Returns an error (nothing may be committed) when a write or a
/// dead-letter publish failed.
async fn apply_batch<S: Source>(
    args: &ConsumerArgs,
    batch: &[Record],
    parsed: Vec<std::result::Result<Objects<S>, String>>,
) -> Result<()> {
    let mut objects: BTreeMap<String, Vec<S::Row>> = BTreeMap::new();
    let mut good = 0usize;
    let mut bytes = 0usize;
    let mut sorted: Vec<(&Record, std::result::Result<Objects<S>, String>)> =
        batch.iter().zip(parsed).collect();
    // Within an object, later deliveries win: apply records in log order.
    sorted.sort_by_key(|(r, _)| (r.partition, r.offset));
    for (rec, outcome) in sorted {
        bytes += rec.payload.len();
        match outcome {
            Ok(groups) => {
                good += 1;
                for (key, rows) in groups {
                    match objects.entry(key) {
                        Entry::Vacant(e) => {
                            e.insert(rows);
                        }
                        Entry::Occupied(mut e) => e.get_mut().extend(rows),
                    }
                }
            }
            Err(reason) => {
                warn!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, error = %reason, "message sent to the dead-letter topic");
                let dlq = dead_letter(args.publisher.as_ref(), rec, &reason).await;
                args.metrics.add_malformed(S::NAME, dlq.is_ok());
                // A failed DLQ write must not drop the record: retry later.
                dlq?;
            }
        }
    }
    let rows: usize = objects.values().map(Vec::len).sum();
    let n = objects.len();
    // Per first folder (a ticker), the newest time of this batch.
    let mut marks: BTreeMap<String, chrono::DateTime<chrono::Utc>> = BTreeMap::new();
    for (key, rows) in &objects {
        if let Some(t) = rows.iter().filter_map(S::row_time).max() {
            let folder = key.split('/').next().unwrap_or(key).to_string();
            let m = marks.entry(folder).or_insert(t);
            *m = (*m).max(t);
        }
    }
    let store = args.store.as_ref();
    let metrics = &args.metrics;
    futures::stream::iter(objects)
        .map(|(key, rows)| async move {
            let started = Instant::now();
            let conflicts = write_rows::<S>(store, &key, Arc::new(rows)).await?;
            metrics.add_write(S::NAME, started.elapsed(), conflicts);
            Ok::<_, Error>(())
        })
        .buffer_unordered(args.config.write_concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    // Written, not yet committed: a crash from here redelivers the batch,
    // whose objects are already what the watermark says.
    // Not for live_bars: live mode appends those rows, and a batch run
    // per live bar would only replay them.
    if args.topic != topics::LIVE_BARS {
        let marks: Vec<(String, chrono::DateTime<chrono::Utc>)> = marks.into_iter().collect();
        args.db.advance_watermarks(S::NAME, &marks).await?;
    }
    args.metrics
        .add_batch(S::NAME, batch.len(), good, bytes, rows);
    debug!(
        source = S::NAME,
        records = batch.len(),
        rows,
        objects = n,
        "batch written"
    );
    Ok(())
}

/// The per-object locks of this process: writers of one process take turns
/// on an object instead of racing on its version.
static OBJECT_LOCKS: LazyLock<Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(Default::default);

fn object_lock(bucket: &str, key: &str) -> Arc<tokio::sync::Mutex<()>> {
    let mut map = OBJECT_LOCKS.lock().unwrap_or_else(|p| p.into_inner());
    let id = format!("{bucket}/{key}");
    if let Some(l) = map.get(&id).and_then(Weak::upgrade) {
        return l;
    }
    if map.len() > 4096 {
        map.retain(|_, w| w.strong_count() > 0);
    }
    let l = Arc::new(tokio::sync::Mutex::new(()));
    map.insert(id, Arc::downgrade(&l));
    l
}

/// Reads an object with its version, retrying a read that broke off: a
/// server may fail a body read while another writer replaces the object
/// (s3s-fs 0.14.1 then sends the new version's checksum with the old
/// content, which the client refuses). 8 tries, 10 ms doubling, with jitter.
async fn get_retrying(
    store: &dyn ObjectStore,
    bucket: &str,
    key: &str,
) -> Result<Option<(Bytes, String)>> {
    let mut tries = 0u32;
    loop {
        match store.get_tagged(bucket, key).await {
            Ok(v) => return Ok(v),
            Err(e) if tries < 7 => {
                tries += 1;
                debug!(bucket, key, error = %e, "read failed; trying again");
                let ms = 10 * 2u64.pow(tries - 1);
                tokio::time::sleep(Duration::from_millis(ms + rand::random::<u64>() % ms)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How often a write retries after losing the race to another writer.
const MAX_CONFLICTS: u32 = 50;

/// Merges `rows` into the object `key` of `S`'s bucket with a conditional
/// write, retrying when another writer got there first. Returns how many
/// times it lost that race.
pub async fn write_object<S: Source>(
    store: &dyn ObjectStore,
    key: &str,
    rows: &[S::Row],
) -> Result<u32> {
    let lock = object_lock(S::BUCKET, key);
    let _turn = lock.lock().await;
    merge_rows::<S>(store, key, Arc::new(rows.to_vec())).await
}

/// [`write_object`] of rows the caller gives up (no copy).
async fn write_rows<S: Source>(
    store: &dyn ObjectStore,
    key: &str,
    rows: Arc<Vec<S::Row>>,
) -> Result<u32> {
    let lock = object_lock(S::BUCKET, key);
    let _turn = lock.lock().await;
    merge_rows::<S>(store, key, rows).await
}

/// Objects this process has seen exist (written or read), by
/// `bucket/key`; forgotten wholesale past [`KNOWN_OBJECTS_MAX`].
static KNOWN_OBJECTS: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);
const KNOWN_OBJECTS_MAX: usize = 200_000;

fn known_object(id: &str) -> bool {
    let known = KNOWN_OBJECTS.lock().unwrap_or_else(|p| p.into_inner());
    known.contains(id)
}

fn remember_object(id: String) {
    let mut known = KNOWN_OBJECTS.lock().unwrap_or_else(|p| p.into_inner());
    if known.len() >= KNOWN_OBJECTS_MAX {
        known.clear();
    }
    known.insert(id);
}

/// [`write_object`] without this process's per-object lock: the
/// conditional write alone, as writers in different processes race.
///
/// An object this process has not seen is first written as new, with
/// `If-None-Match: *`, without reading it: on the reference workload every
/// ticker-week is new, and the read that would answer "absent" was a third
/// of the requests. If the object exists after all, that write is refused
/// and the usual read, merge and `If-Match` write follow; the refusal is
/// not a conflict between writers and is not counted as one.
pub async fn merge_into_object<S: Source>(
    store: &dyn ObjectStore,
    key: &str,
    rows: &[S::Row],
) -> Result<u32> {
    merge_rows::<S>(store, key, Arc::new(rows.to_vec())).await
}

async fn merge_rows<S: Source>(
    store: &dyn ObjectStore,
    key: &str,
    rows: Arc<Vec<S::Row>>,
) -> Result<u32> {
    let id = format!("{}/{key}", S::BUCKET);
    let mut conflicts = 0;
    let mut assume_absent = !known_object(&id);
    loop {
        let current = if assume_absent {
            None
        } else {
            get_retrying(store, S::BUCKET, key).await?
        };
        let (old, tag) = match current {
            Some((data, tag)) => (Some(data), Some(tag)),
            None => (None, None),
        };
        let (k, new) = (key.to_string(), rows.clone());
        let data = tokio::task::spawn_blocking(move || S::merge(&k, old, &new))
            .await
            .map_err(|e| Error::invalid("merge", format!("{}/{key}: {e}", S::BUCKET)))??;
        if store.put_if(S::BUCKET, key, data, tag.as_deref()).await? {
            remember_object(id);
            return Ok(conflicts);
        }
        if std::mem::take(&mut assume_absent) {
            continue;
        }
        conflicts += 1;
        if conflicts >= MAX_CONFLICTS {
            return Err(Error::Store {
                op: "put_if",
                bucket: S::BUCKET.into(),
                key: key.into(),
                message: format!("lost the race to other writers {conflicts} times in a row"),
            });
        }
        let jitter = rand::random::<u64>() % (5 * conflicts as u64 + 5);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
    }
}
