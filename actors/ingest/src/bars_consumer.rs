//! The bars source: `h_alpaca` and `live_bars` records (one ticker-week of
//! 1-minute bars each) → one Parquet object per (ticker, ISO week) in
//! `stock-data/{ticker}/{yyyy}/{mm}/`. [`BarsConsumerActor`] is the
//! [`ConsumerActor`] of this source.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, NaiveTime, Utc};
use tickmesh_core::types::{bars_object_key, Bar, BarsMessage, IsoWeek};
use tickmesh_core::Result;
use tickmesh_io::parquet_io::{decode_bars, encode_bars, merge_bars};
use tickmesh_io::store::{buckets, ObjectStore};

use crate::consumer::{write_object, ConsumerActor, Objects, Source};
use crate::macro_consumer::key_folder;

/// Bars: rows are bars, objects are ticker-weeks.
pub struct Bars;

/// The consumer of `h_alpaca` / `live_bars`.
pub type BarsConsumerActor = ConsumerActor<Bars>;

/// A ticker-week's key and its bars, from a message. A message is usually
/// one week in time order: its bars are grouped in runs, the week looked
/// up once per run, and a message of one run moves its bars as they are.
fn weeks(msg: BarsMessage) -> Objects<Bars> {
    let BarsMessage { ticker, bars } = msg;
    // [start, end) of a week in UTC seconds, and the week.
    let week_at = |t: DateTime<Utc>| {
        let w = IsoWeek::of(t);
        let start = w.monday().and_time(NaiveTime::MIN).and_utc().timestamp();
        (start, start + 7 * 86_400, w)
    };
    let mut runs: Vec<(IsoWeek, std::ops::Range<usize>)> = Vec::new();
    let mut cur: Option<(i64, i64, IsoWeek)> = None;
    for (i, b) in bars.iter().enumerate() {
        let s = b.t.timestamp();
        match cur {
            Some((lo, hi, _)) if (lo..hi).contains(&s) => {
                if let Some(last) = runs.last_mut() {
                    last.1.end = i + 1;
                }
            }
            _ => {
                let (lo, hi, w) = week_at(b.t);
                cur = Some((lo, hi, w));
                runs.push((w, i..i + 1));
            }
        }
    }
    if let [(w, _)] = runs.as_slice() {
        return vec![(bars_object_key(&ticker, *w), bars)];
    }
    let mut weeks: BTreeMap<IsoWeek, Vec<Bar>> = BTreeMap::new();
    for (w, range) in runs {
        weeks.entry(w).or_default().extend_from_slice(&bars[range]);
    }
    weeks
        .into_iter()
        .map(|(w, bars)| (bars_object_key(&ticker, w), bars))
        .collect()
}

impl Source for Bars {
    const NAME: &'static str = "bars";
    const BUCKET: &'static str = buckets::STOCK_DATA;
    type Row = Bar;

    fn parse(payload: &[u8]) -> Result<Objects<Self>> {
        Ok(weeks(BarsMessage::parse(payload)?))
    }

    fn row_time(row: &Bar) -> Option<chrono::DateTime<chrono::Utc>> {
        Some(row.t)
    }

    /// The ticker column comes from the key (`{ticker}/{yyyy}/{mm}/…`).
    fn merge(key: &str, old: Option<Bytes>, new: &[Self::Row]) -> Result<Bytes> {
        let ticker = key_folder(key, "bars merge")?;
        let what = format!("{}/{key}", buckets::STOCK_DATA);
        match old {
            Some(b) => encode_bars(ticker, &merge_bars(decode_bars(b, &what)?, new)),
            // A new object of bars in time order (the usual delivery) is
            // its own merge: encoded without a copy.
            None if in_order(new) => encode_bars(ticker, new),
            None => encode_bars(ticker, &merge_bars(Vec::new(), new)),
        }
    }
}

/// Strictly increasing times, at the file's resolution (what
/// [`merge_bars`] would return unchanged).
fn in_order(bars: &[Bar]) -> bool {
    bars.windows(2)
        .all(|w| w[0].t.timestamp_micros() < w[1].t.timestamp_micros())
}

/// Merges a message's bars into their ticker-week objects (the consumer's
/// write path, for tests and tools that write bars directly); returns how
/// many objects were written.
pub async fn write_bars(store: &dyn ObjectStore, msg: &BarsMessage) -> Result<usize> {
    let groups = weeks(msg.clone());
    let n = groups.len();
    for (key, rows) in groups {
        write_object::<Bars>(store, &key, &rows).await?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tickmesh_core::synthetic::SyntheticMarket;

    /// The definition: each bar to its week's object, in delivery order.
    fn weeks_by_bar(msg: BarsMessage) -> Objects<Bars> {
        let mut weeks: BTreeMap<IsoWeek, Vec<Bar>> = BTreeMap::new();
        for b in msg.bars {
            weeks.entry(IsoWeek::of(b.t)).or_default().push(b);
        }
        weeks
            .into_iter()
            .map(|(w, bars)| (bars_object_key(&msg.ticker, w), bars))
            .collect()
    }

    #[test]
    fn grouping_in_runs_equals_grouping_bar_by_bar() {
        let d = |s: &str| s.parse().unwrap();
        // Thursday to the next Tuesday: two ISO weeks, and a year's end.
        for (from, to) in [("2024-03-07", "2024-03-12"), ("2020-12-30", "2021-01-05")] {
            let bars = SyntheticMarket.bars("TEST", d(from), d(to));
            let one_week: Vec<Bar> = bars[..100].to_vec();
            let mut shuffled = bars.clone();
            shuffled.reverse();
            shuffled.swap(3, bars.len() - 4);
            for bars in [bars, one_week, shuffled] {
                let msg = BarsMessage {
                    ticker: "TEST".into(),
                    bars,
                };
                assert_eq!(weeks(msg.clone()), weeks_by_bar(msg), "{from}..{to}");
            }
        }
    }
}
