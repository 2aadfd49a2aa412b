//! `AggregatorActor`: receives `Run { tickers, interval }`, reads each
//! ticker's Parquet objects from `stock-data/{ticker}/`, resamples them to the
//! interval, computes the feature columns, bulk-loads `aggregated_data` (one
//! transaction per ticker, idempotent), marks the tickers active in
//! `companies_info`, and publishes one `start_model` message for the tickers
//! it loaded. Parquet decoding and indicator math run on blocking threads.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::stream::{self, StreamExt};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tickmesh_core::types::{topics, validate_ticker, Bar, Interval, StartModel};
use tickmesh_core::{Error, Result};
use tickmesh_features::{feature_rows, FeatureConfig};
use tickmesh_io::bus::SharedPublisher;
use tickmesh_io::db::Db;
use tickmesh_io::parquet_io::{decode_bars, merge_bars};
use tickmesh_io::store::{buckets, SharedStore};
use tracing::info;

use crate::resample::resample;

#[derive(Clone, Copy)]
pub struct AggregatorActor;

/// What one run did, per ticker.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AggregateReport {
    /// Rows loaded per ticker.
    pub rows: BTreeMap<String, usize>,
    /// The newest bar timestamp loaded.
    pub watermark: Option<DateTime<Utc>>,
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
}

impl ractor::Message for AggregatorMsg {}

#[derive(Clone)]
pub struct AggregatorArgs {
    /// The indicator periods (`[features]`).
    pub features: FeatureConfig,
    pub store: SharedStore,
    pub db: Db,
    pub publisher: SharedPublisher,
}

impl Actor for AggregatorActor {
    type Msg = AggregatorMsg;
    type State = AggregatorArgs;
    type Arguments = AggregatorArgs;

    async fn pre_start(
        &self,
        _: ActorRef<Self::Msg>,
        args: AggregatorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AggregatorMsg::Run {
                tickers,
                interval,
                reply,
            } => {
                let result = run(state, &tickers, interval)
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

/// How many of a ticker's objects are fetched at once.
const READ_CONCURRENCY: usize = 16;

/// Reads every bar of a ticker from the store, merged and sorted: objects
/// are fetched `READ_CONCURRENCY` at a time and decoded off the reactor as
/// they arrive (a blob is dropped once decoded), in key order, so weekly
/// objects concatenate in time order and the one merge at the end only
/// checks the order (a sort and "last delivery wins" only when objects
/// overlap).
pub async fn read_ticker_bars(store: &SharedStore, ticker: &str) -> Result<Vec<Bar>> {
    let keys = store
        .list(buckets::STOCK_DATA, &format!("{ticker}/"))
        .await?;
    if keys.is_empty() {
        return Err(Error::NotFound(format!(
            "unknown ticker {ticker}: no bars under {}/{ticker}/",
            buckets::STOCK_DATA
        )));
    }
    let mut decoded = stream::iter(keys)
        .map(|k| {
            let store = store.clone();
            async move {
                let Some(blob) = store.get(buckets::STOCK_DATA, &k).await? else {
                    return Ok(Vec::new());
                };
                tokio::task::spawn_blocking(move || decode_bars(blob, &k))
                    .await
                    .expect("decode task panicked")
            }
        })
        .buffered(READ_CONCURRENCY);
    let mut all = Vec::new();
    while let Some(bars) = decoded.next().await {
        all.extend(bars?);
    }
    Ok(tokio::task::spawn_blocking(move || merge_bars(all, &[]))
        .await
        .expect("merge task panicked"))
}

/// One aggregation run (what `Run` does).
pub async fn run(
    state: &AggregatorArgs,
    tickers: &[String],
    interval: Interval,
) -> Result<AggregateReport> {
    let mut report = AggregateReport::default();
    for t in tickers {
        validate_ticker(t)?;
    }
    let columns = state.features.columns();
    for ticker in tickers {
        let bars = read_ticker_bars(&state.store, ticker).await?;
        let features = state.features.clone();
        let (rows, extended) = tokio::task::spawn_blocking(move || {
            let r = resample(&bars, interval);
            (feature_rows(&features, &r.bars), r.extended)
        })
        .await
        .expect("feature task panicked");
        if extended > 0 {
            info!(ticker = %ticker, extended, "bars outside the regular session left out");
        }
        state
            .db
            .load_aggregated(ticker, interval, &columns, &rows)
            .await?;
        if let Some(last) = rows.last() {
            report.watermark = report.watermark.max(Some(last.ts));
        }
        info!(ticker = %ticker, %interval, rows = rows.len(), "aggregated_data loaded");
        report.rows.insert(ticker.clone(), rows.len());
    }
    state.db.upsert_companies(tickers).await?;
    let msg = StartModel {
        interval,
        tickers: tickers.to_vec(),
        watermark: report.watermark.unwrap_or_else(Utc::now),
    };
    let payload =
        serde_json::to_vec(&msg).map_err(|e| Error::invalid("start_model", e.to_string()))?;
    state
        .publisher
        .publish(topics::START_MODEL, interval.as_str(), &payload, &[])
        .await?;
    info!(%interval, tickers = tickers.len(), "start_model published");
    Ok(report)
}
