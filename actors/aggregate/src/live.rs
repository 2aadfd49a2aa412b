//! Live mode (`[aggregate] live`): `LiveAggregator` reads `live_bars` in its
//! own consumer group (the ingest role reads it too, and writes the bars to
//! their ticker-week objects and dead-letters bad records). Each new
//! 1-minute bar advances the series' indicator state, and every bucket it
//! completes becomes a row, with the joins, appended to `aggregated_data`
//! in one transaction per record and series.
//!
//! A series' state is built on first use by folding the indicators over its
//! stored rows (the batch run's output), so a live row equals the row a
//! batch run over the same bars would write: the same `IndicatorState`
//! steps over the same buckets. A record is committed only once none of its
//! bars waits in an unfinished bucket, so after a restart the bars of such a
//! bucket are delivered again. A series with no stored rows waits for a
//! batch run (`on_ingest` starts one). The joined macro series and
//! fundamentals are read again every 5 minutes. Bars at or before the end of the last
//! stored bucket are already in it and are skipped; a bucket is complete
//! once the bar of its last minute has arrived (a 1-minute bucket at once,
//! a daily one with the bar before the close).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tickmesh_core::types::{topics, AggRow, Bar, BarsMessage, Interval};
use tickmesh_core::Result;
use tickmesh_features::{IndicatorState, Ohlcv};
use tickmesh_io::bus::{BusConfig, Record, Subscription};
use tickmesh_io::db::LoadMode;
use tracing::{info, warn};

use crate::aggregator::{read_fundamentals, read_macros, AggregatorArgs};
use crate::joins::{fiscal_years, FiscalYear, Joins, MacroSeries};
use crate::resample::{bucket_end, resample};

#[derive(Clone, Copy)]
pub struct LiveAggregator;

/// Messages of [`LiveAggregator`].
#[derive(Debug)]
pub enum LiveMsg {
    /// Take the next record (sent to itself).
    Poll,
}

impl ractor::Message for LiveMsg {}

#[derive(Clone)]
pub struct LiveArgs {
    pub bus: BusConfig,
    pub aggregator: AggregatorArgs,
    /// The intervals live rows are appended to.
    pub intervals: Vec<Interval>,
}

/// One series' live state.
struct Series {
    indicators: IndicatorState,
    /// The end of the last bucket written (bars before it are in it).
    written_until: Option<DateTime<Utc>>,
    /// Bars of buckets not complete yet.
    pending: Vec<Bar>,
}

/// How often the joined macro series and fundamentals are read again.
const JOINS_REFRESH: Duration = Duration::from_secs(300);

pub struct LiveState {
    sub: Box<dyn Subscription>,
    args: LiveArgs,
    columns: Vec<String>,
    macros: Arc<Vec<MacroSeries>>,
    /// Each ticker's fiscal years, read on first use after a refresh.
    years: HashMap<String, Vec<FiscalYear>>,
    refreshed: Instant,
    series: HashMap<(String, Interval), Series>,
    /// Records processed but not committed, in order, with their ticker and
    /// newest bar: a record is committed once none of its bars waits in an
    /// unfinished bucket, so a restart delivers those bars again.
    held: VecDeque<(Record, String, Option<DateTime<Utc>>)>,
}

impl Actor for LiveAggregator {
    type Msg = LiveMsg;
    type State = LiveState;
    type Arguments = LiveArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: LiveArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let sub = args
            .bus
            .subscribe(topics::LIVE_BARS, "aggregate-live")
            .await?;
        let a = &args.aggregator;
        let mut columns = a.features.columns();
        columns.extend(a.joins.columns());
        a.db.ensure_aggregated_columns(&columns).await?;
        let macros = Arc::new(read_macros(&a.store, &a.joins).await?);
        myself.cast(LiveMsg::Poll)?;
        Ok(LiveState {
            sub,
            args,
            columns,
            macros,
            years: HashMap::new(),
            refreshed: Instant::now(),
            series: HashMap::new(),
            held: VecDeque::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        _: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if st.refreshed.elapsed() >= JOINS_REFRESH {
            let a = &st.args.aggregator;
            st.macros = Arc::new(read_macros(&a.store, &a.joins).await?);
            st.years.clear();
            st.refreshed = Instant::now();
        }
        if let Some(rec) = st.sub.poll(Duration::from_millis(500)).await? {
            let (ticker, newest) = match BarsMessage::parse(&rec.payload) {
                Ok(msg) => {
                    for interval in st.args.intervals.clone() {
                        let n = append(st, &msg.ticker, interval, &msg.bars).await?;
                        if n > 0 {
                            info!(ticker = %msg.ticker, %interval, rows = n, "live rows appended");
                        }
                    }
                    (msg.ticker, msg.bars.iter().map(|b| b.t).max())
                }
                // The ingest role dead-letters it (it reads the same topic).
                Err(e) => {
                    warn!(offset = rec.offset, error = %e, "malformed live_bars record skipped");
                    (String::new(), None)
                }
            };
            st.held.push_back((rec, ticker, newest));
            while let Some((_, ticker, newest)) = st.held.front() {
                let waiting = newest.is_some_and(|t| {
                    st.args.intervals.iter().any(|i| {
                        st.series
                            .get(&(ticker.clone(), *i))
                            .and_then(|s| s.pending.first())
                            .is_some_and(|p| p.t <= t)
                    })
                });
                if waiting {
                    break;
                }
                let (rec, _, _) = st.held.pop_front().expect("front exists");
                st.sub.commit(&rec).await?;
            }
        }
        myself.cast(LiveMsg::Poll)?;
        Ok(())
    }
}

/// Builds a series' state from its stored rows; `None` while the series
/// has no rows (a batch run starts it).
async fn series_of(
    args: &AggregatorArgs,
    ticker: &str,
    interval: Interval,
) -> Result<Option<Series>> {
    let ohlcv: Vec<String> = ["open", "high", "low", "close", "volume"]
        .map(String::from)
        .to_vec();
    let stored = args
        .db
        .read_aggregated(ticker, interval, &ohlcv, None)
        .await?;
    let mut indicators = IndicatorState::new(&args.features);
    for r in &stored {
        let bar = Ohlcv::of_row(&r.values).ok_or_else(|| {
            tickmesh_core::Error::invalid(
                "stored row",
                format!("{ticker} {interval} at {}: OHLCV missing", r.ts),
            )
        })?;
        indicators.step(bar);
    }
    Ok(stored.last().map(|r| Series {
        indicators,
        written_until: Some(bucket_end(r.ts, interval)),
        pending: Vec::new(),
    }))
}

/// Appends the rows of the buckets `bars` complete; returns how many.
async fn append(
    st: &mut LiveState,
    ticker: &str,
    interval: Interval,
    bars: &[Bar],
) -> Result<usize> {
    let key = (ticker.to_string(), interval);
    if !st.series.contains_key(&key) {
        match series_of(&st.args.aggregator, ticker, interval).await? {
            Some(s) => {
                st.series.insert(key.clone(), s);
            }
            None => {
                info!(%ticker, %interval, "no stored rows yet: live rows start after a batch run");
                return Ok(0);
            }
        }
    }
    let s = st.series.get_mut(&key).expect("inserted above");
    let from = s.written_until;
    let newest = s.pending.last().map(|b| b.t);
    s.pending.extend(
        bars.iter()
            .filter(|b| from.is_none_or(|f| b.t >= f) && newest.is_none_or(|n| b.t > n))
            .copied(),
    );
    let Some(last) = s.pending.last().map(|b| b.t) else {
        return Ok(0);
    };
    let buckets = resample(&s.pending, interval).bars;
    let mut rows = Vec::new();
    let mut until = None;
    for b in buckets {
        let end = bucket_end(b.t, interval);
        if last + chrono::Duration::minutes(1) < end {
            break;
        }
        let mut values = s.indicators.step(Ohlcv::from(&b));
        values.reserve(st.macros.len() + st.args.aggregator.joins.fundamentals.len());
        rows.push(AggRow { ts: b.t, values });
        until = Some(end);
    }
    let Some(until) = until else {
        return Ok(0);
    };
    if !st.years.contains_key(ticker) {
        let a = &st.args.aggregator;
        let company = read_fundamentals(&a.store, ticker).await?;
        st.years.insert(
            ticker.to_string(),
            fiscal_years(&company, a.joins.fundamentals_lag_days),
        );
    }
    Joins {
        macros: &st.macros,
        fundamentals: &st.years[ticker],
        metrics: &st.args.aggregator.joins.fundamentals_indices(),
    }
    .apply(&mut rows);
    let n = rows.len();
    let result = st
        .args
        .aggregator
        .db
        .load_series(ticker, interval, &st.columns, rows, LoadMode::Upsert)
        .await;
    if result.is_ok() {
        s.pending.retain(|b| b.t >= until);
        s.written_until = Some(until);
    }
    if let Err(e) = result {
        // The state stepped past rows that were not written: rebuild it
        // from the table (after the restart this error brings).
        st.series.remove(&key);
        return Err(e);
    }
    Ok(n)
}
