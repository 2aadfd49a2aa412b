//! `BarsConsumerActor`: receives `h_alpaca` (or `live_bars`) records from the
//! bus, validates them, merges each ticker-week into its Parquet object in
//! `stock-data/{ticker}/{yyyy}/{mm}/`, and only then commits the offset.
//!
//! A record that fails validation is logged, counted and sent to
//! `<topic>.dlq` with headers naming topic, partition, offset and the error;
//! the consumer goes on. So is a record whose processing panics: the panic
//! is caught at the record's boundary, so no message can crash the consumer
//! into a restart loop that never gets past it. A record that cannot be
//! written (the store is down) is not committed: the actor fails, its
//! supervisor restarts it and the record is delivered again. Nothing
//! accepted is lost.

use std::collections::BTreeMap;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tickmesh_core::bus::{dead_letter, BusConfig, Record, SharedPublisher, Subscription};
use tickmesh_core::parquet_io::{decode_bars, encode_bars, merge_bars};
use tickmesh_core::store::{buckets, ObjectStore, SharedStore};
use tickmesh_core::types::{bars_object_key, Bar, BarsMessage, IsoWeek};
use tickmesh_core::Result;
use tracing::{info, warn};

use crate::metrics::IngestMetrics;

#[derive(Clone, Copy)]
pub struct BarsConsumerActor;

/// Messages of [`BarsConsumerActor`].
#[derive(Debug)]
pub enum BarsConsumerMsg {
    /// Take the next record from the bus (the actor sends this to itself).
    Poll,
}

impl ractor::Message for BarsConsumerMsg {}

#[derive(Clone)]
pub struct BarsConsumerArgs {
    pub bus: BusConfig,
    /// `h_alpaca` or `live_bars`.
    pub topic: String,
    /// Consumer group suffix.
    pub group: String,
    pub store: SharedStore,
    pub publisher: SharedPublisher,
    pub metrics: IngestMetrics,
}

pub struct BarsConsumerState {
    sub: Box<dyn Subscription>,
    args: BarsConsumerArgs,
}

impl Actor for BarsConsumerActor {
    type Msg = BarsConsumerMsg;
    type State = BarsConsumerState;
    type Arguments = BarsConsumerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let sub = args.bus.subscribe(&args.topic, &args.group)?;
        info!(topic = %args.topic, "bars consumer started");
        myself.cast(BarsConsumerMsg::Poll)?;
        Ok(BarsConsumerState { sub, args })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            BarsConsumerMsg::Poll => {
                if let Some(rec) = state.sub.poll(Duration::from_millis(500)).await? {
                    handle_record(&state.args, &rec).await?;
                    state.sub.commit(&rec).await?;
                }
                myself.cast(BarsConsumerMsg::Poll)?;
            }
        }
        Ok(())
    }
}

/// Test hook: a message for this ticker panics while it is processed
/// (`TICKMESH_FAILPOINT_PANIC_BARS`).
const FAILPOINT: &str = "TICKMESH_FAILPOINT_PANIC_BARS";

/// Validates and writes one record. `Ok(Err(reason))`: the record is bad.
async fn process(args: &BarsConsumerArgs, rec: &Record) -> Result<std::result::Result<(), String>> {
    let msg = match BarsMessage::parse(&rec.payload) {
        Ok(m) => m,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if std::env::var(FAILPOINT).is_ok_and(|t| t == msg.ticker) {
        panic!("failpoint {FAILPOINT}={}", msg.ticker);
    }
    let objects = write_bars(args.store.as_ref(), &msg).await?;
    args.metrics.add_message(msg.bars.len(), objects);
    info!(ticker = %msg.ticker, bars = msg.bars.len(), objects, offset = rec.offset, "bars written");
    Ok(Ok(()))
}

/// Processes one record: writes it, or dead-letters it when it is invalid
/// or its processing panicked. Returns an error only when the record could
/// not be written (retry later).
pub async fn handle_record(args: &BarsConsumerArgs, rec: &Record) -> Result<()> {
    use futures::FutureExt;
    let outcome = std::panic::AssertUnwindSafe(process(args, rec))
        .catch_unwind()
        .await;
    let reason = match outcome {
        Ok(Ok(Ok(()))) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Err(reason))) => reason,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            format!("processing the message panicked: {what}")
        }
    };
    warn!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, error = %reason, "message sent to the dead-letter topic");
    let dlq = dead_letter(args.publisher.as_ref(), rec, &reason).await;
    if let Err(ref de) = dlq {
        warn!(error = %de, "dead-letter publish failed");
    }
    args.metrics.add_malformed(dlq.is_ok());
    // A failed DLQ write must not drop the record: retry it later.
    dlq
}

/// Merges a message's bars into their ticker-week objects; returns how many
/// objects were written.
pub async fn write_bars(store: &dyn ObjectStore, msg: &BarsMessage) -> Result<usize> {
    let mut weeks: BTreeMap<IsoWeek, Vec<Bar>> = BTreeMap::new();
    for b in &msg.bars {
        weeks.entry(IsoWeek::of(b.t)).or_default().push(*b);
    }
    let n = weeks.len();
    for (week, bars) in weeks {
        let key = bars_object_key(&msg.ticker, week);
        let old = store.get(buckets::STOCK_DATA, &key).await?;
        let ticker = msg.ticker.clone();
        let what = format!("{}/{key}", buckets::STOCK_DATA);
        let data = tokio::task::spawn_blocking(move || -> Result<bytes::Bytes> {
            let old = match old {
                Some(b) => decode_bars(b, &what)?,
                None => Vec::new(),
            };
            encode_bars(&ticker, &merge_bars(old, &bars))
        })
        .await
        .expect("parquet task panicked")?;
        store.put(buckets::STOCK_DATA, &key, data).await?;
    }
    Ok(n)
}
