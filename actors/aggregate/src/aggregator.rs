//! `AggregatorActor`: receives `Run { tickers, interval }`, reads each
//! ticker's Parquet objects from `stock-data/{ticker}/`, resamples them to the
//! interval, computes the feature columns, joins the macro series and the
//! company's fundamentals as of each bar ([`crate::joins`]), loads the series
//! into `aggregated_data` (one transaction per ticker, replacing it whole;
//! idempotent), marks the tickers active in `companies_info`, and publishes
//! one `start_model` message for the tickers it loaded. Tickers run
//! `parallel` at a time; Parquet decoding, indicator math and the database
//! encoding run on blocking threads.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tickmesh_core::config::{ClusterConfig, JoinConfig};
use tickmesh_core::types::{
    topics, validate_ticker, AggRow, Bar, Fundamentals, Interval, StartModel,
};
use tickmesh_core::{Error, Result};
use tickmesh_features::{feature_rows_with_room, FeatureConfig};
use tickmesh_io::bus::SharedPublisher;
use tickmesh_io::db::{Db, LoadMode, Watermark};
use tickmesh_io::parquet_io::{
    decode_bars, decode_fundamentals, decode_macro, merge_bars, merge_fundamentals, merge_macro,
};
use tickmesh_io::store::{buckets, SharedStore};
use tracing::info;

use crate::auto::{Auto, Watch};
use crate::joins::{fiscal_years, Joins, MacroSeries};
use crate::resample::{bucket_end, resample};

#[derive(Clone, Copy)]
pub struct AggregatorActor;

/// What one run did, per ticker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AggregateReport {
    /// Rows loaded per ticker.
    pub rows: BTreeMap<String, usize>,
    /// The newest bar timestamp loaded.
    pub watermark: Option<DateTime<Utc>>,
    /// The tickers whose rows changed (the `start_model` lists them).
    pub changed: Vec<String>,
}

/// Messages of [`AggregatorActor`].
pub enum AggregatorMsg {
    /// Aggregate these tickers on this interval, load them and publish
    /// `start_model`; the reply carries the report or the error text.
    Run {
        tickers: Vec<String>,
        interval: Interval,
        reply: Option<RpcReplyPort<Result<AggregateReport, String>>>,
    },
    /// Look at the Admin API's requests, the ingest watermarks and the
    /// schedule (the actor sends this to itself when it runs on its own).
    Tick,
}

impl ractor::Message for AggregatorMsg {}

#[derive(Clone)]
pub struct AggregatorArgs {
    /// The indicator periods (`[features]`).
    pub features: FeatureConfig,
    /// The macro series and fundamentals joined (`[joins]`).
    pub joins: JoinConfig,
    /// Tickers aggregated at once (twice the node's cores by default).
    pub parallel: usize,
    pub store: SharedStore,
    pub db: Db,
    pub publisher: SharedPublisher,
    /// Run on its own (`[aggregate]`); `None`: only when asked (`Run`).
    pub auto: Option<Auto>,
}

/// The state of [`AggregatorActor`].
pub struct AggregatorState {
    args: AggregatorArgs,
    watch: Option<Watch>,
}

/// Failed ticks in a row (each already logged) after which the actor stops
/// and its supervisor restarts it (and gives up past its budget).
const MAX_FAILED_TICKS: u32 = 30;

impl AggregatorArgs {
    /// This aggregator running on its own as node `node`, as `[aggregate]` says.
    pub fn automatic(mut self, cfg: &ClusterConfig, node: &str) -> Self {
        self.auto = Some(Auto {
            config: cfg.aggregate.clone(),
            node: node.to_string(),
        });
        self
    }

    /// A node's aggregator: `[features]`, `[joins]`, and twice as many
    /// tickers at once as the node has cores (its `cpus`, else the
    /// machine's), at most the PostgreSQL pool less 2.
    pub fn of(
        cfg: &ClusterConfig,
        cpus: Option<u32>,
        store: SharedStore,
        db: Db,
        publisher: SharedPublisher,
    ) -> Self {
        // Twice the cores: a ticker spends much of its time waiting on the
        // object store and the database, so more in flight overlap better
        // (measured in BENCHMARKS.md).
        let mut parallel = 2 * cpus
            .map(|c| c as usize)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if cfg.cluster.backend == tickmesh_core::config::Backend::Distributed {
            // Each load holds a connection for its whole COPY: leave two
            // of the pool to everything else.
            parallel = parallel.min((cfg.postgres.max_connections as usize).saturating_sub(2));
        }
        AggregatorArgs {
            features: cfg.features.clone(),
            joins: cfg.joins.clone(),
            parallel: parallel.max(1),
            store,
            db,
            publisher,
            auto: None,
        }
    }
}

impl Actor for AggregatorActor {
    type Msg = AggregatorMsg;
    type State = AggregatorState;
    type Arguments = AggregatorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: AggregatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let watch = args.auto.as_ref().map(|a| {
            let _ = myself.send_message(AggregatorMsg::Tick);
            Watch::new(&a.config)
        });
        Ok(AggregatorState { args, watch })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AggregatorMsg::Tick => {
                let (Some(auto), Some(watch)) = (&state.args.auto, &mut state.watch) else {
                    return Ok(());
                };
                match crate::auto::tick(&state.args, auto, watch).await {
                    Ok(()) => watch.failures = 0,
                    Err(e) => {
                        watch.failures += 1;
                        tracing::error!(error = %e, failures = watch.failures, "aggregate tick failed");
                        if watch.failures >= MAX_FAILED_TICKS {
                            return Err(format!(
                                "{} aggregate ticks failed in a row, the last: {e}",
                                watch.failures
                            )
                            .into());
                        }
                    }
                }
                myself.send_after(
                    std::time::Duration::from_millis(auto.config.poll_ms),
                    || AggregatorMsg::Tick,
                );
            }
            AggregatorMsg::Run {
                tickers,
                interval,
                reply,
            } => {
                let result = run(&state.args, &tickers, interval)
                    .await
                    .map_err(|e| e.to_string());
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                } else if let Err(e) = result {
                    tracing::error!(error = %e, "aggregation failed");
                }
            }
        }
        Ok(())
    }
}

/// How many objects are fetched at once.
const READ_CONCURRENCY: usize = 16;

/// Reads and decodes every object under `bucket/prefix`, `READ_CONCURRENCY`
/// at a time, decoding off the reactor as they arrive (a blob is dropped
/// once decoded), in key order: one decoded chunk per object. Callers join
/// the chunks once, into a vector of the exact size ([`concat`]), rather
/// than grow one on the reactor (that growth, its copies and the fresh
/// pages it faulted in were a tenth of a run's CPU).
async fn read_objects<T: Send + 'static>(
    store: &SharedStore,
    bucket: &'static str,
    prefix: &str,
    decode: fn(bytes::Bytes, &str) -> Result<Vec<T>>,
) -> Result<Vec<Vec<T>>> {
    let keys = store.list(bucket, prefix).await?;
    let mut decoded = stream::iter(keys)
        .map(|k| {
            let store = store.clone();
            async move {
                let Some(blob) = store.get(bucket, &k).await? else {
                    return Ok(Vec::new());
                };
                let what = format!("{bucket}/{k}");
                tokio::task::spawn_blocking(move || decode(blob, &what))
                    .await
                    .expect("decode task panicked")
            }
        })
        .buffered(READ_CONCURRENCY);
    let mut chunks = Vec::new();
    while let Some(rows) = decoded.next().await {
        chunks.push(rows?);
    }
    Ok(chunks)
}

/// The chunks [`read_objects`] returns, joined in order into one vector
/// allocated once.
fn concat<T>(chunks: Vec<Vec<T>>) -> Vec<T> {
    let mut all = Vec::with_capacity(chunks.iter().map(Vec::len).sum());
    for c in chunks {
        all.extend(c);
    }
    all
}

/// Reads every bar of a ticker from the store, merged and sorted: weekly
/// objects come in key order, so they concatenate in time order and the
/// one merge at the end only checks the order (a sort and "last delivery
/// wins" only when objects overlap).
pub async fn read_ticker_bars(store: &SharedStore, ticker: &str) -> Result<Vec<Bar>> {
    let chunks = read_objects(
        store,
        buckets::STOCK_DATA,
        &format!("{ticker}/"),
        decode_bars,
    )
    .await?;
    if chunks.iter().all(Vec::is_empty) {
        return Err(Error::NotFound(format!(
            "unknown ticker {ticker}: no bars under {}/{ticker}/",
            buckets::STOCK_DATA
        )));
    }
    Ok(
        tokio::task::spawn_blocking(move || merge_bars(concat(chunks), &[]))
            .await
            .expect("merge task panicked"),
    )
}

/// The macro series `joins` names, read from `macro-data/{series}/`. A
/// configured series with no observations is an error naming it.
pub async fn read_macros(store: &SharedStore, joins: &JoinConfig) -> Result<Vec<MacroSeries>> {
    let mut out = Vec::with_capacity(joins.macro_lags.len());
    for (series, &lag) in &joins.macro_lags {
        let obs = concat(
            read_objects(
                store,
                buckets::MACRO_DATA,
                &format!("{series}/"),
                decode_macro,
            )
            .await?,
        );
        if obs.is_empty() {
            return Err(Error::NotFound(format!(
                "macro series {series} (joined by [joins] macro) has no observations under {}/{series}/: ingest it (tickmesh produce macro or fred) or remove it from [joins]",
                buckets::MACRO_DATA
            )));
        }
        out.push(MacroSeries::new(series, lag, &merge_macro(obs, &[])));
    }
    Ok(out)
}

/// A company's fundamentals from `company-fundamentals/{ticker}/` (none is
/// not an error: its columns are NULL).
pub async fn read_fundamentals(store: &SharedStore, ticker: &str) -> Result<Vec<Fundamentals>> {
    let rows = concat(
        read_objects(
            store,
            buckets::COMPANY,
            &format!("{ticker}/"),
            decode_fundamentals,
        )
        .await?,
    );
    Ok(merge_fundamentals(rows, &[]))
}

/// One ticker's rows of `aggregated_data`: its bars resampled to the
/// regular session's `interval` buckets, the indicators, then the joins.
/// Returns the rows and how many bars were outside the session. Pure CPU
/// work: call it off the reactor.
pub fn compute_rows(
    features: &FeatureConfig,
    joins: &JoinConfig,
    macros: &[MacroSeries],
    bars: Vec<Bar>,
    company: &[Fundamentals],
    interval: Interval,
) -> (Vec<AggRow>, usize) {
    let last_bar = bars.last().map(|b| b.t);
    let mut r = resample(&bars, interval);
    drop(bars);
    // A last bucket still filling (its last minute not in yet, its end to
    // come) is left to the next run or to live mode.
    if let (Some(b), Some(last_bar)) = (r.bars.last(), last_bar) {
        let end = bucket_end(b.t, interval);
        if last_bar + chrono::Duration::minutes(1) < end && end > Utc::now() {
            r.bars.pop();
        }
    }
    let extra = macros.len() + joins.fundamentals.len();
    let mut rows = feature_rows_with_room(features, &r.bars, extra);
    let years = fiscal_years(company, joins.fundamentals_lag_days);
    Joins {
        macros,
        fundamentals: &years,
        metrics: &joins.fundamentals_indices(),
    }
    .apply(&mut rows);
    (rows, r.extended)
}

/// What one ticker's aggregation did.
struct TickerDone {
    rows: usize,
    last: Option<DateTime<Utc>>,
    /// Whether the load wrote or deleted anything.
    changed: bool,
}

/// Reads, resamples, computes, joins and loads one ticker.
async fn aggregate_ticker(
    state: &AggregatorArgs,
    ticker: &str,
    interval: Interval,
    macros: &Arc<Vec<MacroSeries>>,
    columns: &[String],
) -> Result<TickerDone> {
    let (bars, company) = futures::try_join!(
        read_ticker_bars(&state.store, ticker),
        read_fundamentals(&state.store, ticker)
    )?;
    let (features, joins, macros) = (state.features.clone(), state.joins.clone(), macros.clone());
    let (rows, extended) = tokio::task::spawn_blocking(move || {
        compute_rows(&features, &joins, &macros, bars, &company, interval)
    })
    .await
    .expect("feature task panicked");
    if extended > 0 {
        info!(ticker = %ticker, extended, "bars outside the regular session left out");
    }
    let (n, last) = (rows.len(), rows.last().map(|r| r.ts));
    info!(ticker = %ticker, %interval, rows = n, "loading aggregated_data");
    let load = state
        .db
        .load_series(ticker, interval, columns, rows, LoadMode::Replace)
        .await?;
    let done = TickerDone {
        rows: n,
        last,
        changed: load.written + load.deleted > 0,
    };
    info!(ticker = %ticker, %interval, rows = done.rows, written = load.written, deleted = load.deleted, "aggregated_data loaded");
    Ok(done)
}

/// One aggregation run (what `Run` does). Tickers run `parallel` at a time,
/// each in its own transaction. The tickers that loaded are marked with the
/// ingest version they consumed and, those whose rows changed, announced in
/// one `start_model` (none when nothing changed); when any ticker failed,
/// the error then names each failure.
pub async fn run(
    state: &AggregatorArgs,
    tickers: &[String],
    interval: Interval,
) -> Result<AggregateReport> {
    let mut report = AggregateReport::default();
    for t in tickers {
        validate_ticker(t)?;
    }
    let mut columns = state.features.columns();
    columns.extend(state.joins.columns());
    state.db.ensure_aggregated_columns(&columns).await?;
    // The versions this run consumes, read before any object is.
    let versions: std::collections::HashMap<String, Watermark> = state
        .db
        .active_watermarks()
        .await?
        .into_iter()
        .map(|w| (w.ticker.clone(), w))
        .collect();
    let macros = Arc::new(read_macros(&state.store, &state.joins).await?);
    let mut done = stream::iter(tickers.iter().cloned())
        .map(|t| {
            let (macros, columns) = (macros.clone(), columns.clone());
            async move {
                let r = aggregate_ticker(state, &t, interval, &macros, &columns).await;
                (t, r)
            }
        })
        .buffer_unordered(state.parallel.max(1));
    let mut failed = Vec::new();
    let mut marks = Vec::new();
    while let Some((ticker, result)) = done.next().await {
        match result {
            Ok(d) => {
                report.watermark = report.watermark.max(d.last);
                if d.changed {
                    report.changed.push(ticker.clone());
                }
                marks.extend(versions.get(&ticker).cloned());
                report.rows.insert(ticker, d.rows);
            }
            Err(e) => failed.push(format!("{ticker}: {e}")),
        }
    }
    drop(done);
    // What loaded stays loaded, marked and announced, whatever else failed.
    state.db.set_aggregate_marks(interval, &marks).await?;
    let loaded: Vec<String> = report.rows.keys().cloned().collect();
    state.db.upsert_companies(&loaded).await?;
    report.changed.sort();
    if report.changed.is_empty() {
        info!(%interval, tickers = loaded.len(), "nothing changed: no start_model");
    } else {
        let msg = StartModel {
            interval,
            tickers: report.changed.clone(),
            watermark: report.watermark.unwrap_or_else(Utc::now),
        };
        let payload =
            serde_json::to_vec(&msg).map_err(|e| Error::invalid("start_model", e.to_string()))?;
        state
            .publisher
            .publish(topics::START_MODEL, interval.as_str(), &payload, &[])
            .await?;
        info!(%interval, tickers = msg.tickers.len(), "start_model published");
    }
    if !failed.is_empty() {
        failed.sort();
        return Err(Error::Partial(format!(
            "aggregation {interval}: {} of {} tickers failed ({} loaded{}): {}",
            failed.len(),
            tickers.len(),
            report.rows.len(),
            if report.changed.is_empty() {
                String::new()
            } else {
                format!(", start_model for {}", report.changed.join(","))
            },
            failed.join("; ")
        )));
    }
    Ok(report)
}
