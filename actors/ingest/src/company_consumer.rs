//! The company source: `h_company` records (one symbol-year of
//! fundamentals) → one Parquet object per (symbol, calendarYear) in
//! `company-fundamentals/{symbol}/{yyyy}/`. [`CompanyConsumerActor`] is the
//! [`ConsumerActor`] of this source.

use bytes::Bytes;
use tickmesh_core::types::{company_object_key, Fundamentals};
use tickmesh_core::Result;
use tickmesh_io::parquet_io::{decode_fundamentals, encode_fundamentals, merge_fundamentals};
use tickmesh_io::store::buckets;

use crate::consumer::{ConsumerActor, Objects, Source};

/// Fundamentals: a row is a symbol-year, and so is an object.
pub struct Company;

/// The consumer of `h_company`.
pub type CompanyConsumerActor = ConsumerActor<Company>;

impl Source for Company {
    const NAME: &'static str = "company";
    const BUCKET: &'static str = buckets::COMPANY;
    type Row = Fundamentals;

    fn parse(payload: &[u8]) -> Result<Objects<Self>> {
        let row = Fundamentals::parse(payload)?;
        Ok(vec![(
            company_object_key(&row.symbol, row.calendar_year),
            vec![row],
        )])
    }

    /// The end of the fiscal year (31 December of `calendarYear` when unknown).
    fn row_time(row: &Fundamentals) -> Option<chrono::DateTime<chrono::Utc>> {
        row.period_end
            .or_else(|| chrono::NaiveDate::from_ymd_opt(row.calendar_year, 12, 31))
            .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
    }

    fn merge(key: &str, old: Option<Bytes>, new: &[Self::Row]) -> Result<Bytes> {
        let what = format!("{}/{key}", buckets::COMPANY);
        let old = match old {
            Some(b) => decode_fundamentals(b, &what)?,
            None => Vec::new(),
        };
        encode_fundamentals(&merge_fundamentals(old, new))
    }
}
