//! The macro source: `h_macrodata` records (observations of one FRED series)
//! → one Parquet object per (series, year) in `macro-data/{series}/{yyyy}/`,
//! not one file per record as the original did. [`MacroConsumerActor`] is
//! the [`ConsumerActor`] of this source.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::Datelike;
use tickmesh_core::types::{macro_object_key, MacroMessage, Observation};
use tickmesh_core::{Error, Result};
use tickmesh_io::parquet_io::{decode_macro, encode_macro, merge_macro};
use tickmesh_io::store::buckets;

use crate::consumer::{ConsumerActor, Objects, Source};

/// Macro series: rows are observations, objects are series-years.
pub struct Macro;

/// The consumer of `h_macrodata`.
pub type MacroConsumerActor = ConsumerActor<Macro>;

impl Source for Macro {
    const NAME: &'static str = "macro";
    const BUCKET: &'static str = buckets::MACRO_DATA;
    type Row = Observation;

    fn parse(payload: &[u8]) -> Result<Objects<Self>> {
        let msg = MacroMessage::parse(payload)?;
        let mut years: BTreeMap<i32, Vec<Observation>> = BTreeMap::new();
        for o in msg.observations {
            years.entry(o.date.year()).or_default().push(o);
        }
        Ok(years
            .into_iter()
            .map(|(y, obs)| (macro_object_key(&msg.series, y), obs))
            .collect())
    }

    fn row_time(row: &Observation) -> Option<chrono::DateTime<chrono::Utc>> {
        Some(row.date.and_time(chrono::NaiveTime::MIN).and_utc())
    }

    /// The series column comes from the key (`{series}/{yyyy}/…`).
    fn merge(key: &str, old: Option<Bytes>, new: &[Self::Row]) -> Result<Bytes> {
        let series = key_folder(key, "macro merge")?;
        let what = format!("{}/{key}", buckets::MACRO_DATA);
        let old = match old {
            Some(b) => decode_macro(b, &what)?,
            None => Vec::new(),
        };
        encode_macro(series, &merge_macro(old, new))
    }
}

/// The first folder of an object key: the ticker, series or symbol.
pub(crate) fn key_folder<'a>(key: &'a str, what: &'static str) -> Result<&'a str> {
    match key.split_once('/') {
        Some((t, _)) if !t.is_empty() => Ok(t),
        _ => Err(Error::invalid(what, format!("{key}: no folder"))),
    }
}
