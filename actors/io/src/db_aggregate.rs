//! What drives the aggregate role, in the database every node shares.
//!
//! - `ingest_watermarks (source, key, through)`: the ingest role's
//!   progress. After a batch's objects are written, and before its offsets
//!   are committed, each ticker in it advances to the newest bar time of the
//!   batch. A ticker's messages share a partition and are applied in log
//!   order, so everything delivered for it up to that record is written.
//!   A watermark never moves back. A ticker seen for the first time becomes
//!   an active company (`companies_info`) unless an operator has turned it
//!   off.
//! - `aggregate_marks (ticker, interval, through)`: the ingest watermark
//!   that the last successful aggregation of the series consumed.
//! - `aggregate_requests`: runs asked for through the Admin API, claimed by
//!   an aggregate node under a lease (a node that dies leaves its request to
//!   the next one) and finished with a summary or the error; the role's
//!   own runs (on ingest, on schedule) are recorded there too.

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::db::Db;
use tickmesh_core::types::Interval;
use tickmesh_core::{Error, Result};

/// One `aggregate_requests` row.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateRequest {
    pub id: String,
    /// What asked for it: `admin`, `ingest` or `schedule`.
    pub trigger: String,
    /// Empty: every active ticker with data.
    pub tickers: Vec<String>,
    pub interval: Interval,
    /// `queued`, `running`, `done` or `failed`.
    pub state: String,
    /// What a finished run did, or why it failed.
    pub outcome: String,
    pub created_at: DateTime<Utc>,
}

impl Db {
    /// Advances ingest watermarks (see the module header); `marks` are
    /// (key, newest time written).
    pub async fn advance_watermarks(
        &self,
        source: &str,
        marks: &[(String, DateTime<Utc>)],
    ) -> Result<()> {
        if marks.is_empty() {
            return Ok(());
        }
        let ctx = format!("advance the {source} ingest watermarks");
        let max = match self {
            Db::Postgres(_) => "GREATEST",
            Db::Sqlite(_) => "MAX",
        };
        let upsert = self.sql(&format!(
            "INSERT INTO ingest_watermarks (source, key, through, updated_at) VALUES ($1, $2, $3, $4) ON CONFLICT (source, key) DO UPDATE SET through = {max}(ingest_watermarks.through, excluded.through), updated_at = excluded.updated_at"
        ));
        let company = self.sql(
            "INSERT INTO companies_info (ticker, active) VALUES ($1, TRUE) ON CONFLICT (ticker) DO NOTHING",
        );
        let now = Utc::now();
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.map_err(Error::db(ctx.clone()))?;
                for (key, through) in marks {
                    sqlx::query(&upsert)
                        .bind(source)
                        .bind(key)
                        .bind(*through)
                        .bind(now)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx.clone()))?;
                    if source == "bars" {
                        sqlx::query(&company)
                            .bind(key)
                            .execute(&mut *tx)
                            .await
                            .map_err(Error::db(ctx.clone()))?;
                    }
                }
                tx.commit().await.map_err(Error::db(ctx))?;
            }};
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        Ok(())
    }

    /// The bars watermark of every active ticker, by ticker.
    pub async fn active_watermarks(&self) -> Result<Vec<(String, DateTime<Utc>)>> {
        let q = "SELECT w.key, w.through FROM ingest_watermarks w JOIN companies_info c ON c.ticker = w.key WHERE w.source = 'bars' AND c.active ORDER BY w.key";
        let ctx = "read the ingest watermarks";
        Ok(match self {
            Db::Postgres(p) => sqlx::query(q)
                .fetch_all(p)
                .await
                .map_err(Error::db(ctx))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
            Db::Sqlite(p) => sqlx::query(q)
                .fetch_all(p)
                .await
                .map_err(Error::db(ctx))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        })
    }

    /// The watermark each series of `interval` was last aggregated through.
    pub async fn aggregate_marks(
        &self,
        interval: Interval,
    ) -> Result<std::collections::HashMap<String, DateTime<Utc>>> {
        let q = self.sql("SELECT ticker, through FROM aggregate_marks WHERE \"interval\" = $1");
        let ctx = "read the aggregate marks";
        Ok(match self {
            Db::Postgres(p) => sqlx::query(&q)
                .bind(interval.as_str())
                .fetch_all(p)
                .await
                .map_err(Error::db(ctx))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
            Db::Sqlite(p) => sqlx::query(&q)
                .bind(interval.as_str())
                .fetch_all(p)
                .await
                .map_err(Error::db(ctx))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        })
    }

    /// Records what a successful run of `interval` consumed.
    pub async fn set_aggregate_marks(
        &self,
        interval: Interval,
        marks: &[(String, DateTime<Utc>)],
    ) -> Result<()> {
        let q = self.sql(
            "INSERT INTO aggregate_marks (ticker, \"interval\", through) VALUES ($1, $2, $3) ON CONFLICT (ticker, \"interval\") DO UPDATE SET through = excluded.through",
        );
        let ctx = "record the aggregate marks";
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.map_err(Error::db(ctx))?;
                for (t, through) in marks {
                    sqlx::query(&q)
                        .bind(t)
                        .bind(interval.as_str())
                        .bind(*through)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx))?;
                }
                tx.commit().await.map_err(Error::db(ctx))?;
            }};
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        Ok(())
    }

    /// Queues an aggregation (the Admin API); returns its id.
    pub async fn request_aggregation(
        &self,
        tickers: &[String],
        interval: Interval,
    ) -> Result<String> {
        self.insert_aggregate_row("admin", tickers, interval, "queued", "")
            .await
    }

    /// Records a run the role started on its own (`trigger`: `ingest` or
    /// `schedule`), finished: `done` with its summary or `failed` with the
    /// error. Returns its id.
    pub async fn log_aggregate_run(
        &self,
        trigger: &str,
        tickers: &[String],
        interval: Interval,
        outcome: std::result::Result<&str, &str>,
    ) -> Result<String> {
        let (state, text) = match outcome {
            Ok(s) => ("done", s),
            Err(e) => ("failed", e),
        };
        self.insert_aggregate_row(trigger, tickers, interval, state, text)
            .await
    }

    async fn insert_aggregate_row(
        &self,
        trigger: &str,
        tickers: &[String],
        interval: Interval,
        state: &str,
        outcome: &str,
    ) -> Result<String> {
        let id = format!(
            "agg-{}-{:08x}",
            Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
            rand::random::<u32>()
        );
        let q = self.sql(
            "INSERT INTO aggregate_requests (id, trigger, tickers, \"interval\", state, outcome, node, lease_until, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, '', $7, $7, $7)",
        );
        let now = Utc::now();
        let ctx = "record an aggregation";
        let tickers = tickers.join(",");
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&q)
                    .bind(&id)
                    .bind(trigger)
                    .bind(&tickers)
                    .bind(interval.as_str())
                    .bind(state)
                    .bind(outcome)
                    .bind(now)
                    .execute($pool)
                    .await
                    .map(|_| ())
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(ctx))?;
        Ok(id)
    }

    /// The newest aggregations (requested or automatic), newest first.
    pub async fn aggregations(&self, limit: i64) -> Result<Vec<AggregateRequest>> {
        let q = self.sql(
            "SELECT id, trigger, tickers, \"interval\", state, outcome, created_at FROM aggregate_requests ORDER BY created_at DESC LIMIT $1",
        );
        let ctx = "list aggregations";
        match self {
            Db::Postgres(p) => sqlx::query(&q)
                .bind(limit)
                .fetch_all(p)
                .await
                .map_err(Error::db(ctx))?
                .iter()
                .map(request_of)
                .collect(),
            Db::Sqlite(p) => sqlx::query(&q)
                .bind(limit)
                .fetch_all(p)
                .await
                .map_err(Error::db(ctx))?
                .iter()
                .map(request_of)
                .collect(),
        }
    }

    /// Claims the oldest queued request, or a running one whose node's
    /// lease ran out, for `node` until `lease_until`.
    pub async fn claim_aggregate_request(
        &self,
        node: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<AggregateRequest>> {
        let now = Utc::now();
        let q = self.sql(
            "UPDATE aggregate_requests SET state = 'running', node = $1, lease_until = $2, updated_at = $3 WHERE id = (SELECT id FROM aggregate_requests WHERE state = 'queued' OR (state = 'running' AND lease_until < $3) ORDER BY created_at LIMIT 1) AND (state = 'queued' OR (state = 'running' AND lease_until < $3)) RETURNING id, trigger, tickers, \"interval\", state, outcome, created_at",
        );
        let ctx = "claim an aggregation request";
        let row = match self {
            Db::Postgres(p) => sqlx::query(&q)
                .bind(node)
                .bind(lease_until)
                .bind(now)
                .fetch_optional(p)
                .await
                .map_err(Error::db(ctx))?
                .map(|r| request_of(&r)),
            Db::Sqlite(p) => sqlx::query(&q)
                .bind(node)
                .bind(lease_until)
                .bind(now)
                .fetch_optional(p)
                .await
                .map_err(Error::db(ctx))?
                .map(|r| request_of(&r)),
        };
        row.transpose()
    }

    /// Ends a claimed request: `done` with a summary, or `failed` with the error.
    pub async fn finish_aggregate_request(
        &self,
        id: &str,
        outcome: std::result::Result<String, String>,
    ) -> Result<()> {
        let (state, text) = match outcome {
            Ok(s) => ("done", s),
            Err(e) => ("failed", e),
        };
        let q = self.sql(
            "UPDATE aggregate_requests SET state = $1, outcome = $2, updated_at = $3 WHERE id = $4",
        );
        let ctx = format!("finish aggregation request {id}");
        let now = Utc::now();
        match self {
            Db::Postgres(p) => sqlx::query(&q)
                .bind(state)
                .bind(&text)
                .bind(now)
                .bind(id)
                .execute(p)
                .await
                .map(|_| ()),
            Db::Sqlite(p) => sqlx::query(&q)
                .bind(state)
                .bind(&text)
                .bind(now)
                .bind(id)
                .execute(p)
                .await
                .map(|_| ()),
        }
        .map_err(Error::db(ctx))
    }

    /// One request, by id.
    pub async fn aggregate_request(&self, id: &str) -> Result<Option<AggregateRequest>> {
        let q = self.sql(
            "SELECT id, trigger, tickers, \"interval\", state, outcome, created_at FROM aggregate_requests WHERE id = $1",
        );
        let ctx = format!("read aggregation request {id}");
        let row = match self {
            Db::Postgres(p) => sqlx::query(&q)
                .bind(id)
                .fetch_optional(p)
                .await
                .map_err(Error::db(ctx))?
                .map(|r| request_of(&r)),
            Db::Sqlite(p) => sqlx::query(&q)
                .bind(id)
                .fetch_optional(p)
                .await
                .map_err(Error::db(ctx))?
                .map(|r| request_of(&r)),
        };
        row.transpose()
    }
}

fn request_of<R: Row>(r: &R) -> Result<AggregateRequest>
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> DateTime<Utc>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let tickers: String = r.get(2);
    let interval: String = r.get(3);
    Ok(AggregateRequest {
        id: r.get(0),
        trigger: r.get(1),
        tickers: tickers
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
        interval: interval
            .parse()
            .map_err(|e| Error::invalid("aggregation request", format!("{e}")))?,
        state: r.get(4),
        outcome: r.get(5),
        created_at: r.get(6),
    })
}
