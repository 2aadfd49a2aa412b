//! What drives the aggregate role, in the database every node shares.
//!
//! - `ingest_watermarks (source, key, through, writes)`: the ingest role's
//!   progress. After a batch's objects are written, and before its offsets
//!   are committed, each key in it (a ticker of `bars`, a symbol of
//!   `company`, a series of `macro`) counts one more write and advances
//!   `through` to the newest time it wrote (never back). A ticker seen for
//!   the first time in `bars` becomes an active company (`companies_info`)
//!   unless an operator has turned it off.
//! - A ticker's **version** is the writes of its bars, plus those of its
//!   fundamentals, plus those of every macro series: it grows with any write
//!   that can change its rows (a backfill of old weeks, a new 10-K, a macro
//!   release), not only with newer bars.
//! - `aggregate_marks (ticker, interval, version, through)`: the version a
//!   successful load of the series consumed.
//! - `aggregate_requests`: runs asked for through the Admin API, claimed by
//!   an aggregate node under a lease (a node that dies leaves its request to
//!   the next one) and finished with a summary or the error; the role's
//!   own runs (on ingest, on schedule) are recorded there too.

use chrono::{DateTime, Utc};
use sqlx::Row;

use crate::db::Db;
use tickmesh_core::types::Interval;
use tickmesh_core::{Error, Result};

/// The same sqlx code on whichever pool `db` holds (the two pools are
/// different types, so each arm compiles it for its own).
macro_rules! on_pool {
    ($db:expr, |$p:ident| $body:expr) => {
        match $db {
            Db::Postgres($p) => $body,
            Db::Sqlite($p) => $body,
        }
    };
}

/// A ticker's ingest progress (see the module header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watermark {
    pub ticker: String,
    /// The newest bar written.
    pub through: DateTime<Utc>,
    pub version: i64,
}

/// How many times a request is claimed before it is failed for good.
const MAX_REQUEST_ATTEMPTS: i64 = 3;

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
            "INSERT INTO ingest_watermarks (source, key, through, writes, updated_at) VALUES ($1, $2, $3, 1, $4) ON CONFLICT (source, key) DO UPDATE SET through = {max}(ingest_watermarks.through, excluded.through), writes = ingest_watermarks.writes + 1, updated_at = excluded.updated_at"
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
        on_pool!(self, |p| run!(p));
        Ok(())
    }

    /// The watermark and version of every active ticker, by ticker.
    pub async fn active_watermarks(&self) -> Result<Vec<Watermark>> {
        let q = "SELECT w.key, w.through, CAST(w.writes + COALESCE((SELECT f.writes FROM ingest_watermarks f WHERE f.source = 'company' AND f.key = w.key), 0) + COALESCE((SELECT SUM(m.writes) FROM ingest_watermarks m WHERE m.source = 'macro'), 0) AS BIGINT) FROM ingest_watermarks w JOIN companies_info c ON c.ticker = w.key WHERE w.source = 'bars' AND c.active ORDER BY w.key";
        let ctx = "read the ingest watermarks";
        Ok(on_pool!(self, |p| sqlx::query(q)
            .fetch_all(p)
            .await
            .map_err(Error::db(ctx))?
            .iter()
            .map(|r| Watermark {
                ticker: r.get(0),
                through: r.get(1),
                version: r.get(2),
            })
            .collect()))
    }

    /// The version each series of `interval` was last loaded from.
    pub async fn aggregate_marks(
        &self,
        interval: Interval,
    ) -> Result<std::collections::HashMap<String, i64>> {
        let q = self.sql("SELECT ticker, version FROM aggregate_marks WHERE \"interval\" = $1");
        let ctx = "read the aggregate marks";
        Ok(on_pool!(self, |p| sqlx::query(&q)
            .bind(interval.as_str())
            .fetch_all(p)
            .await
            .map_err(Error::db(ctx))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()))
    }

    /// Records that the series of `interval` were loaded from these versions.
    pub async fn set_aggregate_marks(&self, interval: Interval, marks: &[Watermark]) -> Result<()> {
        let q = self.sql(
            "INSERT INTO aggregate_marks (ticker, \"interval\", version, through) VALUES ($1, $2, $3, $4) ON CONFLICT (ticker, \"interval\") DO UPDATE SET version = excluded.version, through = excluded.through",
        );
        let ctx = "record the aggregate marks";
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.map_err(Error::db(ctx))?;
                for m in marks {
                    sqlx::query(&q)
                        .bind(&m.ticker)
                        .bind(interval.as_str())
                        .bind(m.version)
                        .bind(m.through)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx))?;
                }
                tx.commit().await.map_err(Error::db(ctx))?;
            }};
        }
        on_pool!(self, |p| run!(p));
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
            "INSERT INTO aggregate_requests (id, trigger, tickers, \"interval\", state, outcome, node, attempts, lease_until, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, '', 0, $7, $7, $7)",
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
        on_pool!(self, |p| run!(p)).map_err(Error::db(ctx))?;
        Ok(id)
    }

    /// The newest aggregations (requested or automatic), newest first.
    pub async fn aggregations(&self, limit: i64) -> Result<Vec<AggregateRequest>> {
        let q = self.sql(
            "SELECT id, trigger, tickers, \"interval\", state, outcome, created_at FROM aggregate_requests ORDER BY created_at DESC LIMIT $1",
        );
        let ctx = "list aggregations";
        on_pool!(self, |p| sqlx::query(&q)
            .bind(limit)
            .fetch_all(p)
            .await
            .map_err(Error::db(ctx))?
            .iter()
            .map(request_of)
            .collect())
    }

    /// Claims the oldest queued request, or a running one whose node's
    /// lease ran out, for `node` until `lease_until`. A request claimed
    /// `MAX_REQUEST_ATTEMPTS` times without finishing (its node died each
    /// time) is failed instead.
    pub async fn claim_aggregate_request(
        &self,
        node: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<Option<AggregateRequest>> {
        let now = Utc::now();
        let give_up = self.sql(&format!(
            "UPDATE aggregate_requests SET state = 'failed', outcome = 'claimed {MAX_REQUEST_ATTEMPTS} times by nodes that did not finish it (see their logs)', updated_at = $1 WHERE state = 'running' AND lease_until < $1 AND attempts >= {MAX_REQUEST_ATTEMPTS}"
        ));
        let q = self.sql(
            "UPDATE aggregate_requests SET state = 'running', node = $1, lease_until = $2, updated_at = $3, attempts = attempts + 1 WHERE id = (SELECT id FROM aggregate_requests WHERE state = 'queued' OR (state = 'running' AND lease_until < $3) ORDER BY created_at LIMIT 1) AND (state = 'queued' OR (state = 'running' AND lease_until < $3)) RETURNING id, trigger, tickers, \"interval\", state, outcome, created_at",
        );
        let ctx = "claim an aggregation request";
        on_pool!(self, |p| sqlx::query(&give_up)
            .bind(now)
            .execute(p)
            .await
            .map(|_| ()))
        .map_err(Error::db(ctx))?;
        on_pool!(self, |p| sqlx::query(&q)
            .bind(node)
            .bind(lease_until)
            .bind(now)
            .fetch_optional(p)
            .await
            .map_err(Error::db(ctx))?
            .map(|r| request_of(&r)))
        .transpose()
    }

    /// Extends `node`'s lease on a running request; false when it is no
    /// longer the node's (another took it over).
    pub async fn renew_aggregate_request(
        &self,
        id: &str,
        node: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<bool> {
        let q = self.sql(
            "UPDATE aggregate_requests SET lease_until = $1 WHERE id = $2 AND node = $3 AND state = 'running'",
        );
        let ctx = format!("renew aggregation request {id}");
        Ok(on_pool!(self, |p| sqlx::query(&q)
            .bind(lease_until)
            .bind(id)
            .bind(node)
            .execute(p)
            .await
            .map_err(Error::db(ctx))?
            .rows_affected())
            > 0)
    }

    /// Ends `node`'s claimed request: `done` with a summary, or `failed`
    /// with the error. Nothing changes (false) when another node has taken
    /// it over.
    pub async fn finish_aggregate_request(
        &self,
        id: &str,
        node: &str,
        outcome: std::result::Result<String, String>,
    ) -> Result<bool> {
        let (state, text) = match outcome {
            Ok(s) => ("done", s),
            Err(e) => ("failed", e),
        };
        let q = self.sql(
            "UPDATE aggregate_requests SET state = $1, outcome = $2, updated_at = $3 WHERE id = $4 AND node = $5 AND state = 'running'",
        );
        let ctx = format!("finish aggregation request {id}");
        let now = Utc::now();
        Ok(on_pool!(self, |p| sqlx::query(&q)
            .bind(state)
            .bind(&text)
            .bind(now)
            .bind(id)
            .bind(node)
            .execute(p)
            .await
            .map_err(Error::db(ctx))?
            .rows_affected())
            > 0)
    }

    /// One request, by id.
    pub async fn aggregate_request(&self, id: &str) -> Result<Option<AggregateRequest>> {
        let q = self.sql(
            "SELECT id, trigger, tickers, \"interval\", state, outcome, created_at FROM aggregate_requests WHERE id = $1",
        );
        let ctx = format!("read aggregation request {id}");
        on_pool!(self, |p| sqlx::query(&q)
            .bind(id)
            .fetch_optional(p)
            .await
            .map_err(Error::db(ctx))?
            .map(|r| request_of(&r)))
        .transpose()
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
