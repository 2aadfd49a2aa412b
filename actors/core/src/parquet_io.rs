//! The Parquet schema of raw bars and its codec.
//!
//! Schema (fixed): `ticker: utf8`, `t: timestamp[us, tz=UTC]`, `o h l c vw:
//! float64`, `v n: int64`. pyarrow, DuckDB and Polars read it unchanged.
//! Encoding and decoding are CPU work: call them from a blocking thread.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::types::Bar;
use crate::{Error, Result};

/// The Arrow schema of a bars file.
pub fn bars_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("ticker", DataType::Utf8, false),
        Field::new(
            "t",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("o", DataType::Float64, false),
        Field::new("h", DataType::Float64, false),
        Field::new("l", DataType::Float64, false),
        Field::new("c", DataType::Float64, false),
        Field::new("v", DataType::Int64, false),
        Field::new("n", DataType::Int64, false),
        Field::new("vw", DataType::Float64, false),
    ]))
}

/// Encodes one ticker's bars as a Parquet file (snappy).
pub fn encode_bars(ticker: &str, bars: &[Bar]) -> Result<Bytes> {
    let ctx = || format!("encode {ticker}");
    let f64col = |f: fn(&Bar) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(bars.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(bars.iter().map(|_| ticker))),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(
                bars.iter().map(|b| b.t.timestamp_micros()),
            )
            .with_timezone("UTC"),
        ),
        f64col(|b| b.o),
        f64col(|b| b.h),
        f64col(|b| b.l),
        f64col(|b| b.c),
        Arc::new(Int64Array::from_iter_values(
            bars.iter().map(|b| b.v.min(i64::MAX as u64) as i64),
        )),
        Arc::new(Int64Array::from_iter_values(
            bars.iter().map(|b| b.n.min(i64::MAX as u64) as i64),
        )),
        f64col(|b| b.vw),
    ];
    let batch =
        RecordBatch::try_new(bars_schema(), columns).map_err(|e| Error::parquet(ctx(), e))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let mut buf = Vec::with_capacity(bars.len() * 40 + 1024);
    let mut w = ArrowWriter::try_new(&mut buf, bars_schema(), Some(props))
        .map_err(|e| Error::parquet(ctx(), e))?;
    w.write(&batch).map_err(|e| Error::parquet(ctx(), e))?;
    w.close().map_err(|e| Error::parquet(ctx(), e))?;
    Ok(Bytes::from(buf))
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str, ctx: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            Error::parquet(
                ctx.to_string(),
                format!("column `{name}` missing or of the wrong type"),
            )
        })
}

/// Decodes a bars file written by [`encode_bars`].
pub fn decode_bars(data: Bytes, what: &str) -> Result<Vec<Bar>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(data)
        .and_then(|b| b.build())
        .map_err(|e| Error::parquet(what, e))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| Error::parquet(what, e))?;
        let t = column::<TimestampMicrosecondArray>(&batch, "t", what)?;
        let f = |n| column::<Float64Array>(&batch, n, what);
        let (o, h, l, c, vw) = (f("o")?, f("h")?, f("l")?, f("c")?, f("vw")?);
        let v = column::<Int64Array>(&batch, "v", what)?;
        let n = column::<Int64Array>(&batch, "n", what)?;
        for i in 0..batch.num_rows() {
            let ts = DateTime::<Utc>::from_timestamp_micros(t.value(i))
                .ok_or_else(|| Error::parquet(what, format!("row {i}: timestamp out of range")))?;
            out.push(Bar {
                t: ts,
                o: o.value(i),
                h: h.value(i),
                l: l.value(i),
                c: c.value(i),
                v: v.value(i).max(0) as u64,
                n: n.value(i).max(0) as u64,
                vw: vw.value(i),
            });
        }
        debug_assert!(t.null_count() == 0);
    }
    Ok(out)
}

/// Merges `new` into `old`: one bar per timestamp, the newer delivery wins,
/// sorted by time.
pub fn merge_bars(old: Vec<Bar>, new: &[Bar]) -> Vec<Bar> {
    let mut by_t: BTreeMap<i64, Bar> = old
        .into_iter()
        .map(|b| (b.t.timestamp_micros(), b))
        .collect();
    for b in new {
        by_t.insert(b.t.timestamp_micros(), *b);
    }
    by_t.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticMarket;

    #[test]
    fn roundtrip_and_merge() {
        let d = |s: &str| s.parse().unwrap();
        let bars = SyntheticMarket.bars("TEST", d("2024-03-04"), d("2024-03-05"));
        let bytes = encode_bars("TEST", &bars).unwrap();
        let back = decode_bars(bytes, "test").unwrap();
        assert_eq!(back, bars);
        let merged = merge_bars(back.clone(), &bars[..10]);
        assert_eq!(merged, bars);
        let mut changed = bars[5];
        changed.c += 1.0;
        let merged = merge_bars(back, &[changed]);
        assert_eq!(merged.len(), bars.len());
        assert_eq!(merged[5], changed);
    }
}
