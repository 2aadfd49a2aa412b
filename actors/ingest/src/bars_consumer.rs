//! The bars source: `h_alpaca` and `live_bars` records (one ticker-week of
//! 1-minute bars each) → one Parquet object per (ticker, ISO week) in
//! `stock-data/{ticker}/{yyyy}/{mm}/`. [`BarsConsumerActor`] is the
//! [`ConsumerActor`] of this source.

use std::collections::BTreeMap;

use bytes::Bytes;
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

/// A ticker-week's key and its bars, from a message.
fn weeks(msg: BarsMessage) -> Objects<Bars> {
    let mut weeks: BTreeMap<IsoWeek, Vec<Bar>> = BTreeMap::new();
    for b in msg.bars {
        weeks.entry(IsoWeek::of(b.t)).or_default().push(b);
    }
    weeks
        .into_iter()
        .map(|(w, bars)| (bars_object_key(&msg.ticker, w), bars))
        .collect()
}

impl Source for Bars {
    const NAME: &'static str = "bars";
    const BUCKET: &'static str = buckets::STOCK_DATA;
    type Row = Bar;

    fn parse(payload: &[u8]) -> Result<Objects<Self>> {
        Ok(weeks(BarsMessage::parse(payload)?))
    }

    /// The ticker column comes from the key (`{ticker}/{yyyy}/{mm}/…`).
    fn merge(key: &str, old: Option<Bytes>, new: &[Self::Row]) -> Result<Bytes> {
        let ticker = key_folder(key, "bars merge")?;
        let what = format!("{}/{key}", buckets::STOCK_DATA);
        let old = match old {
            Some(b) => decode_bars(b, &what)?,
            None => Vec::new(),
        };
        encode_bars(ticker, &merge_bars(old, new))
    }
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
