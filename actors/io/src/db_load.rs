//! Loading `aggregated_data`: one transaction per (ticker, interval).
//!
//! PostgreSQL: the rows are encoded in COPY's binary format on a blocking
//! thread and streamed in 1 MiB chunks into a staging table (or straight
//! into `aggregated_data` when the series has no rows yet), then upserted
//! and, for a [`LoadMode::Replace`], the stored rows the new series lacks
//! up to its last time are deleted, all under one transaction-scoped advisory lock on the
//! series. SQLite: the same staging table, upsert and delete in one
//! transaction. Either way a crash leaves the old rows or the new ones,
//! never a mix; rows whose values did not change are not rewritten, so a
//! replay writes nothing.

use chrono::{DateTime, Utc};
use sqlx::{QueryBuilder, Row};

use crate::db::{check_column_name, Db};
use tickmesh_core::types::{AggRow, Interval};
use tickmesh_core::{Error, Result};

/// How a load treats the rows stored for its (ticker, interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// The rows are the whole series up to their last time: stored rows at
    /// other times up to then go; later ones (live appends a batch run did
    /// not see) stay.
    Replace,
    /// The rows are inserted or updated; other stored rows stay (live appends).
    Upsert,
}

/// What a load did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Rows inserted or changed.
    pub written: u64,
    /// Stored rows deleted (a replace whose series no longer has them).
    pub deleted: u64,
}

/// Upserts of at most this many rows (live appends) skip the staging table.
const SMALL_UPSERT: usize = 500;

/// Bytes per COPY chunk sent to the server.
const CHUNK: usize = 1 << 20;

/// PostgreSQL's epoch (2000-01-01) in Unix microseconds.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Encodes rows in COPY's binary format (`ticker, interval, ts, values…`),
/// calling `emit` with each chunk of about [`CHUNK`] bytes; stops early
/// (returning false) when `emit` does.
pub(crate) fn encode_copy_binary(
    ticker: &str,
    interval: &str,
    rows: &[AggRow],
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> bool {
    let width = rows.first().map_or(0, |r| r.values.len());
    let mut buf = Vec::with_capacity(CHUNK + 64 + 12 * width);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags
    buf.extend_from_slice(&0i32.to_be_bytes()); // header extension
    let fields = i16::try_from(3 + width).expect("checked: at most 1600 columns");
    for r in rows {
        buf.extend_from_slice(&fields.to_be_bytes());
        for s in [ticker, interval] {
            buf.extend_from_slice(&(s.len() as i32).to_be_bytes());
            buf.extend_from_slice(s.as_bytes());
        }
        buf.extend_from_slice(&8i32.to_be_bytes());
        buf.extend_from_slice(&(r.ts.timestamp_micros() - PG_EPOCH_MICROS).to_be_bytes());
        for v in &r.values {
            match v.filter(|v| v.is_finite()) {
                Some(v) => {
                    buf.extend_from_slice(&8i32.to_be_bytes());
                    buf.extend_from_slice(&v.to_bits().to_be_bytes());
                }
                None => buf.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        if buf.len() >= CHUNK && !emit(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK))) {
            return false;
        }
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    emit(buf)
}

impl Db {
    /// Loads one (ticker, interval) series of `columns` (adding the columns
    /// the table lacks first) in one transaction, as `mode` says. The rows
    /// are in time order, each with one value per column; encoding runs
    /// off the reactor.
    pub async fn load_series(
        &self,
        ticker: &str,
        interval: Interval,
        columns: &[String],
        rows: Vec<AggRow>,
        mode: LoadMode,
    ) -> Result<LoadReport> {
        let ctx = format!("load aggregated_data {ticker} {interval}");
        if columns.is_empty() || columns.len() > 1500 {
            return Err(Error::invalid(
                "aggregated row",
                format!("{} columns (1 ..= 1500)", columns.len()),
            ));
        }
        for c in columns {
            check_column_name(c)?;
        }
        for w in rows.windows(2) {
            if w[0].ts >= w[1].ts {
                return Err(Error::invalid(
                    "aggregated rows",
                    format!("{ticker} {interval}: not in time order at {}", w[1].ts),
                ));
            }
        }
        if let Some(r) = rows.iter().find(|r| r.values.len() != columns.len()) {
            return Err(Error::invalid(
                "aggregated row",
                format!(
                    "{ticker} {interval} at {}: {} values for {} columns",
                    r.ts,
                    r.values.len(),
                    columns.len()
                ),
            ));
        }
        self.ensure_aggregated_columns(columns).await?;
        let cols = columns.join(", ");
        match self {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(Error::db(ctx.clone()))?;
                // One loader per series at a time; other series load in parallel.
                sqlx::query("SELECT pg_advisory_xact_lock(7306, hashtext($1))")
                    .bind(format!("{ticker}/{interval}"))
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let stored: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM aggregated_data WHERE ticker = $1 AND \"interval\" = $2)",
                )
                .bind(ticker)
                .bind(interval.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(Error::db(ctx.clone()))?;
                // A few rows (a live append): one INSERT, no staging table.
                if mode == LoadMode::Upsert && rows.len() <= SMALL_UPSERT {
                    let mut report = LoadReport::default();
                    if !rows.is_empty() {
                        let mut qb: QueryBuilder<sqlx::Postgres> = QueryBuilder::new(format!(
                            "INSERT INTO aggregated_data AS a (ticker, \"interval\", ts, {cols}) "
                        ));
                        qb.push_values(rows.iter(), |mut b, r| {
                            b.push_bind(ticker)
                                .push_bind(interval.as_str())
                                .push_bind(r.ts);
                            for v in &r.values {
                                b.push_bind(v.filter(|v| v.is_finite()));
                            }
                        });
                        qb.push(pg_upsert_changed(columns));
                        report.written = qb
                            .build()
                            .execute(&mut *tx)
                            .await
                            .map_err(Error::db(ctx.clone()))?
                            .rows_affected();
                    }
                    failpoint_before_commit(ticker, interval).await;
                    tx.commit().await.map_err(Error::db(ctx))?;
                    return Ok(report);
                }
                // A series with no rows yet is copied straight in.
                let target = if stored { "tmp_agg" } else { "aggregated_data" };
                if stored {
                    sqlx::query(&format!(
                        "CREATE TEMP TABLE tmp_agg ON COMMIT DROP AS SELECT ticker, \"interval\", ts, {cols} FROM aggregated_data WITH NO DATA"
                    ))
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                }
                let mut copy = tx
                    .copy_in_raw(&format!(
                        "COPY {target} (ticker, \"interval\", ts, {cols}) FROM STDIN WITH (FORMAT binary)"
                    ))
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let (chunks_tx, mut chunks) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
                let (t, i) = (ticker.to_string(), interval.as_str());
                let encoder = tokio::task::spawn_blocking(move || {
                    encode_copy_binary(&t, i, &rows, |c| chunks_tx.blocking_send(c).is_ok());
                    drop(rows);
                });
                let mut sent = Ok(());
                while let Some(chunk) = chunks.recv().await {
                    if let Err(e) = copy.send(chunk).await {
                        sent = Err(e);
                        break;
                    }
                }
                drop(chunks);
                encoder.await.expect("COPY encoder panicked");
                let copied = match sent {
                    Ok(()) => copy.finish().await.map_err(Error::db(ctx.clone()))?,
                    Err(e) => {
                        let _ = copy.abort("the load failed").await;
                        return Err(Error::db(ctx)(e));
                    }
                };
                let mut report = LoadReport::default();
                if !stored {
                    report.written = copied;
                } else {
                    // Whatever the planner believes of the series' size
                    // (statistics lag a bulk load), the delete's anti-join
                    // probes an index, never scans the staging table per row.
                    for q in [
                        "SET LOCAL work_mem = '256MB'",
                        "CREATE INDEX ON tmp_agg (ts)",
                        "ANALYZE tmp_agg",
                    ] {
                        sqlx::query(q)
                            .execute(&mut *tx)
                            .await
                            .map_err(Error::db(ctx.clone()))?;
                    }
                    if mode == LoadMode::Replace {
                        report.deleted = sqlx::query(
                            "DELETE FROM aggregated_data a WHERE a.ticker = $1 AND a.\"interval\" = $2 AND a.ts <= (SELECT max(ts) FROM tmp_agg) AND NOT EXISTS (SELECT 1 FROM tmp_agg s WHERE s.ts = a.ts)",
                        )
                        .bind(ticker)
                        .bind(interval.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx.clone()))?
                        .rows_affected();
                    }
                    report.written = sqlx::query(&format!(
                        "INSERT INTO aggregated_data AS a (ticker, \"interval\", ts, {cols}) SELECT ticker, \"interval\", ts, {cols} FROM tmp_agg{}",
                        pg_upsert_changed(columns)
                    ))
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?
                    .rows_affected();
                }
                failpoint_before_commit(ticker, interval).await;
                tx.commit().await.map_err(Error::db(ctx))?;
                Ok(report)
            }
            Db::Sqlite(pool) => {
                // A writer from the start: a deferred transaction that
                // upgrades after another writer commits fails at once
                // (SQLITE_BUSY_SNAPSHOT); this one waits its turn.
                let mut tx = pool
                    .begin_with("BEGIN IMMEDIATE")
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                sqlx::query("DROP TABLE IF EXISTS temp.tmp_agg")
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                sqlx::query(&format!(
                    "CREATE TEMP TABLE tmp_agg AS SELECT ts, {cols} FROM aggregated_data WHERE 0"
                ))
                .execute(&mut *tx)
                .await
                .map_err(Error::db(ctx.clone()))?;
                let per_row = 1 + columns.len();
                for chunk in rows.chunks((30_000 / per_row).max(1)) {
                    let mut qb: QueryBuilder<sqlx::Sqlite> =
                        QueryBuilder::new(format!("INSERT INTO tmp_agg (ts, {cols}) "));
                    qb.push_values(chunk, |mut b, r| {
                        b.push_bind(r.ts);
                        for v in &r.values {
                            b.push_bind(v.filter(|v| v.is_finite()));
                        }
                    });
                    qb.build()
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx.clone()))?;
                }
                let mut report = LoadReport::default();
                if mode == LoadMode::Replace {
                    report.deleted = sqlx::query(
                        "DELETE FROM aggregated_data WHERE ticker = ?1 AND \"interval\" = ?2 AND ts <= (SELECT max(ts) FROM temp.tmp_agg) AND ts NOT IN (SELECT ts FROM temp.tmp_agg)",
                    )
                    .bind(ticker)
                    .bind(interval.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?
                    .rows_affected();
                }
                let changed = columns
                    .iter()
                    .map(|c| format!("aggregated_data.{c} IS NOT excluded.{c}"))
                    .collect::<Vec<_>>()
                    .join(" OR ");
                report.written = sqlx::query(&format!(
                    "INSERT INTO aggregated_data (ticker, \"interval\", ts, {cols}) SELECT ?1, ?2, ts, {cols} FROM temp.tmp_agg WHERE true ON CONFLICT (ticker, \"interval\", ts) DO UPDATE SET {} WHERE {}",
                    set_excluded(columns),
                    if changed.is_empty() { "false".to_string() } else { changed },
                ))
                .bind(ticker)
                .bind(interval.as_str())
                .execute(&mut *tx)
                .await
                .map_err(Error::db(ctx.clone()))?
                .rows_affected();
                sqlx::query("DROP TABLE temp.tmp_agg")
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                failpoint_before_commit(ticker, interval).await;
                tx.commit().await.map_err(Error::db(ctx))?;
                Ok(report)
            }
        }
    }

    /// Upserts rows of one (ticker, interval) in one transaction (stored rows
    /// at other times stay); returns how many were inserted or changed.
    pub async fn load_aggregated(
        &self,
        ticker: &str,
        interval: Interval,
        columns: &[String],
        rows: &[AggRow],
    ) -> Result<u64> {
        self.load_series(ticker, interval, columns, rows.to_vec(), LoadMode::Upsert)
            .await
            .map(|r| r.written)
    }

    /// The newest stored time of a series, if it has rows.
    pub async fn last_aggregated(
        &self,
        ticker: &str,
        interval: Interval,
    ) -> Result<Option<DateTime<Utc>>> {
        let q = self.sql(
            "SELECT ts FROM aggregated_data WHERE ticker = $1 AND \"interval\" = $2 ORDER BY ts DESC LIMIT 1",
        );
        let ctx = format!("read the last row of {ticker} {interval}");
        Ok(match self {
            Db::Postgres(p) => sqlx::query(&q)
                .bind(ticker)
                .bind(interval.as_str())
                .fetch_optional(p)
                .await
                .map_err(Error::db(ctx))?
                .map(|r| r.get(0)),
            Db::Sqlite(p) => sqlx::query(&q)
                .bind(ticker)
                .bind(interval.as_str())
                .fetch_optional(p)
                .await
                .map_err(Error::db(ctx))?
                .map(|r| r.get(0)),
        })
    }
}

/// Pauses a load with everything written but not committed, so a test can
/// kill the process there (`TICKMESH_FAILPOINT_PAUSE_BEFORE_LOAD_COMMIT_MS`).
const FAILPOINT_PAUSE: &str = "TICKMESH_FAILPOINT_PAUSE_BEFORE_LOAD_COMMIT_MS";

async fn failpoint_before_commit(ticker: &str, interval: Interval) {
    if let Some(ms) = std::env::var(FAILPOINT_PAUSE)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        tracing::info!(%ticker, %interval, ms, "failpoint: load written, pausing before its commit");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

/// PostgreSQL's `ON CONFLICT` clause of an insert into `aggregated_data AS
/// a`: only rows whose values differ are rewritten.
fn pg_upsert_changed(columns: &[String]) -> String {
    format!(
        " ON CONFLICT (ticker, \"interval\", ts) DO UPDATE SET {} WHERE ({}) IS DISTINCT FROM ({})",
        set_excluded(columns),
        prefixed("a.", columns),
        prefixed("EXCLUDED.", columns),
    )
}

fn set_excluded(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn prefixed(p: &str, columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| format!("{p}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_binary_layout() {
        let ts = DateTime::from_timestamp(946_684_800 + 1, 0).unwrap();
        let rows = vec![AggRow {
            ts,
            values: vec![Some(1.5), None, Some(f64::NAN)],
        }];
        let mut out = Vec::new();
        assert!(encode_copy_binary("AB", "1d", &rows, |c| {
            out.extend(c);
            true
        }));
        let mut want = b"PGCOPY\n\xff\r\n\0".to_vec();
        want.extend([0u8; 8]);
        want.extend(6i16.to_be_bytes());
        want.extend(2i32.to_be_bytes());
        want.extend(b"AB");
        want.extend(2i32.to_be_bytes());
        want.extend(b"1d");
        want.extend(8i32.to_be_bytes());
        want.extend(1_000_000i64.to_be_bytes());
        want.extend(8i32.to_be_bytes());
        want.extend(1.5f64.to_bits().to_be_bytes());
        want.extend((-1i32).to_be_bytes());
        want.extend((-1i32).to_be_bytes());
        want.extend((-1i16).to_be_bytes());
        assert_eq!(out, want);
    }
}
