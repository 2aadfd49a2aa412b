//! `tickmesh bench-aggregate` (hidden; run by `scripts/bench/aggregate.sh`):
//! the aggregation's compute on a local store, timed the way the Polars peer
//! (`scripts/bench/aggregate_peer.py compute`) times its own: reading the
//! Parquet objects, then the session filter, resampling, indicators and
//! as-of joins, tickers `parallel` at a time. With `--out`, each ticker's
//! rows are written as `{out}/{ticker}.parquet` for the peer to compare.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use futures::stream::{self, StreamExt};
use serde_json::json;
use tickmesh_aggregate::aggregator::{
    compute_rows, read_fundamentals, read_macros, read_ticker_bars,
};
use tickmesh_core::config::{FeatureConfig, JoinConfig};
use tickmesh_core::types::Interval;
use tickmesh_io::parquet_io::encode_agg_rows;
use tickmesh_io::store::SharedStore;

/// One ticker: (ticker, bars read, rows out, read seconds, compute seconds, rows kept).
type Done = (
    String,
    usize,
    usize,
    f64,
    f64,
    Vec<tickmesh_core::types::AggRow>,
);

pub struct Options {
    pub store: SharedStore,
    pub tickers: Vec<String>,
    pub interval: Interval,
    pub joins: JoinConfig,
    pub parallel: usize,
    pub out: Option<PathBuf>,
}

/// Writes the benchmark's input into `store`: synthetic 1-minute bars of
/// `tickers` over `[from, to]` (one object per ticker-week, as the ingest
/// role writes them), the sample's macro series (`data/sample/macrodata.csv`)
/// and its fundamentals, AAPL's, MSFT's and GOOG's rows given to the tickers
/// in turn. Returns the number of bars.
pub async fn generate(
    store: &SharedStore,
    tickers: &[String],
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
    sample: &std::path::Path,
) -> Result<usize> {
    use tickmesh_core::types::{company_object_key, macro_object_key};
    use tickmesh_io::parquet_io::{encode_fundamentals, encode_macro};
    use tickmesh_io::store::buckets;
    let written: Vec<Result<usize>> = stream::iter(tickers)
        .map(|t| {
            let store = store.clone();
            async move {
                let bars = tokio::task::spawn_blocking({
                    let t = t.clone();
                    move || tickmesh_core::synthetic::SyntheticMarket.bars(&t, from, to)
                })
                .await?;
                for msg in tickmesh_ingest::producer::weekly_messages(t, &bars) {
                    tickmesh_ingest::bars_consumer::write_bars(store.as_ref(), &msg).await?;
                }
                Ok(bars.len())
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let mut n = 0;
    for w in written {
        n += w?;
    }
    for m in tickmesh_ingest::producer::read_macro_csv(&sample.join("macrodata.csv"))? {
        let mut years: std::collections::BTreeMap<i32, Vec<_>> = Default::default();
        for o in &m.observations {
            years
                .entry(chrono::Datelike::year(&o.date))
                .or_default()
                .push(*o);
        }
        for (y, obs) in years {
            store
                .put(
                    buckets::MACRO_DATA,
                    &macro_object_key(&m.series, y),
                    encode_macro(&m.series, &obs)?,
                )
                .await?;
        }
    }
    let sample_rows =
        tickmesh_ingest::producer::read_fundamentals(&sample.join("fundamentals.csv"))?;
    let symbols = ["AAPL", "MSFT", "GOOG"];
    for (i, t) in tickers.iter().enumerate() {
        for r in sample_rows.iter().filter(|r| r.symbol == symbols[i % 3]) {
            let mut r = r.clone();
            r.symbol = t.clone();
            store
                .put(
                    buckets::COMPANY,
                    &company_object_key(t, r.calendar_year),
                    encode_fundamentals(std::slice::from_ref(&r))?,
                )
                .await?;
        }
    }
    Ok(n)
}

/// Runs the benchmark and returns its JSON line.
pub async fn run(o: Options) -> Result<serde_json::Value> {
    let store = o.store.clone();
    let features = FeatureConfig::default();
    let mut columns = features.columns();
    columns.extend(o.joins.columns());
    let start_rss = crate::bench_ingest::status_bytes("VmRSS");
    let start = Instant::now();
    let macros = Arc::new(read_macros(&store, &o.joins).await?);
    let results: Vec<Result<Done>> = stream::iter(&o.tickers)
        .map(|t| {
            let (store, features, joins, macros) = (
                store.clone(),
                features.clone(),
                o.joins.clone(),
                macros.clone(),
            );
            let interval = o.interval;
            let keep = o.out.is_some();
            async move {
                let t0 = Instant::now();
                let (bars, company) =
                    futures::try_join!(read_ticker_bars(&store, t), read_fundamentals(&store, t))?;
                let read = t0.elapsed().as_secs_f64();
                let n = bars.len();
                let t1 = Instant::now();
                let (rows, _) = tokio::task::spawn_blocking(move || {
                    compute_rows(&features, &joins, &macros, bars, &company, interval)
                })
                .await?;
                let compute = t1.elapsed().as_secs_f64();
                let count = rows.len();
                Ok((
                    t.clone(),
                    n,
                    count,
                    read,
                    compute,
                    if keep { rows } else { Vec::new() },
                ))
            }
        })
        .buffer_unordered(o.parallel.max(1))
        .collect()
        .await;
    let total = start.elapsed().as_secs_f64();
    let (mut bars_in, mut rows_out, mut read_s, mut compute_s) = (0, 0, 0.0, 0.0);
    for r in results {
        let (t, n, count, read, compute, rows) = r?;
        bars_in += n;
        rows_out += count;
        read_s += read;
        compute_s += compute;
        if let Some(dir) = &o.out {
            std::fs::create_dir_all(dir)?;
            let path = dir.join(format!("{t}.parquet"));
            std::fs::write(&path, encode_agg_rows(&columns, &rows)?)
                .with_context(|| format!("write {}", path.display()))?;
        }
    }
    Ok(json!({
        "peer": "tickmesh",
        "tickers": o.tickers.len(),
        "parallel": o.parallel,
        "bars_in": bars_in,
        "rows_out": rows_out,
        // Summed over tickers (they overlap when parallel > 1).
        "read_s_summed": read_s,
        "compute_s_summed": compute_s,
        "total_s": total,
        "peak_rss_mb": crate::bench_ingest::peak_rss_bytes().map(|b| b / (1 << 20)),
        // Mostly libtorch's libraries, mapped at start.
        "start_rss_mb": start_rss.map(|b| b / (1 << 20)),
    }))
}
