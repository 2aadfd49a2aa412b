//! The database: the feature store (`aggregated_data`) and the registries
//! (`companies_info`, `model_versions`, `assignments`).
//!
//! [`Db`] speaks PostgreSQL (distributed) or SQLite (embedded) through sqlx
//! with the same queries; SQL is written with `$N` placeholders and turned
//! into `?N` for SQLite. Loads are idempotent and atomic: one transaction per
//! load, upserting on the primary key, so a load that fails halfway leaves
//! nothing visible and replaying it changes nothing.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, Row, SqlitePool};

pub use crate::db_aggregate::{AggregateRequest, Watermark};
pub use crate::db_load::{LoadMode, LoadReport};
use tickmesh_core::config::{FeatureConfig, PostgresConfig};
use tickmesh_core::types::{AggRow, Interval};
use tickmesh_core::{Error, Result};

/// One row of `model_versions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub ticker: String,
    pub interval: Interval,
    pub version: i64,
    pub kind: String,
    pub uri: String,
    pub sha256: String,
    pub metrics: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// Something that happened to a model version (table `model_events`): the
/// coordinator's `promoted`, `rejected` (by the gate), `promoted_by_operator`,
/// `rolled_back`; a serve node's `served`, `refused`, `retrying`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelEventRow {
    pub ticker: String,
    pub interval: Interval,
    pub version: i64,
    pub kind: String,
    /// The node that saw it (the coordinator's or a serve node's name).
    pub node: String,
    pub detail: String,
    pub at: DateTime<Utc>,
}

/// A served version's one-step error on the stored bars after its
/// training data (table `live_errors`).
#[derive(Debug, Clone, PartialEq)]
pub struct LiveError {
    pub ticker: String,
    pub interval: Interval,
    pub version: i64,
    /// Bars scored (the last `[retrain] drift_bars` at most).
    pub bars: i64,
    pub rmse: f64,
    /// The newest bar scored.
    pub through: DateTime<Utc>,
}

/// The life of a training job (table `jobs`): `queued` → `assigned` (node,
/// epoch, version, lease) → `done` | `failed`; a failed attempt or a lost
/// lease goes back to `queued` (with `not_before`) while attempts remain.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub ticker: String,
    pub interval: Interval,
    /// Model kind override.
    pub model: Option<String>,
    /// Epochs override.
    pub epochs: Option<i64>,
    pub state: String,
    /// The node of the current (or last) assignment.
    pub node: Option<String>,
    /// The current (or last) assignment epoch; 0 before the first.
    pub epoch: i64,
    /// The version the current (or last) attempt writes; unique per attempt.
    pub version: i64,
    pub lease_until: Option<DateTime<Utc>>,
    pub attempts: i64,
    /// Not assigned before this time (retry backoff).
    pub not_before: DateTime<Utc>,
    /// Why the last attempt failed, or why the job failed.
    pub reason: String,
    /// The job's latest snapshot (bucket `models`), for a resumed attempt.
    pub snapshot_key: String,
    /// The registered version's metrics (JSON) once done.
    pub metrics: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl JobRow {
    /// A new queued job.
    pub fn queued(
        id: String,
        ticker: String,
        interval: Interval,
        model: Option<String>,
        epochs: Option<i64>,
    ) -> Self {
        let now = Utc::now();
        JobRow {
            id,
            ticker,
            interval,
            model,
            epochs,
            state: "queued".into(),
            node: None,
            epoch: 0,
            version: 0,
            lease_until: None,
            attempts: 0,
            not_before: now,
            reason: String::new(),
            snapshot_key: String::new(),
            metrics: String::new(),
            created_at: now,
            updated_at: now,
        }
    }
}

/// One attempt of a job (table `job_attempts`): the job's lineage.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub job_id: String,
    pub epoch: i64,
    pub attempt: i64,
    pub ticker: String,
    pub interval: Interval,
    pub node: String,
    pub version: i64,
    pub assigned_at: DateTime<Utc>,
    /// When the coordinator ended it (done, or lost/failed); `None` while it runs.
    pub ended_at: Option<DateTime<Utc>>,
    /// `running`, `done` or `ended`.
    pub outcome: String,
    pub reason: String,
}

const MODEL_COLUMNS: &str =
    "ticker, \"interval\", version, kind, uri, sha256, metrics, status, created_at";

fn model_of_row<'r, R: Row>(r: &'r R) -> Result<ModelVersion>
where
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    DateTime<Utc>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let interval: String = r.get(1);
    Ok(ModelVersion {
        ticker: r.get(0),
        interval: interval.parse()?,
        version: r.get(2),
        kind: r.get(3),
        uri: r.get(4),
        sha256: r.get(5),
        metrics: r.get(6),
        status: r.get(7),
        created_at: r.get(8),
    })
}

const JOB_COLUMNS: &str = "id, ticker, \"interval\", model, epochs, state, node, epoch, version, lease_until, attempts, not_before, reason, snapshot_key, metrics, created_at, updated_at";

fn job_of_row<'r, R: Row>(r: &'r R) -> Result<JobRow>
where
    usize: sqlx::ColumnIndex<R>,
    String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    DateTime<Utc>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    Option<DateTime<Utc>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let interval: String = r.get(2);
    Ok(JobRow {
        id: r.get(0),
        ticker: r.get(1),
        interval: interval.parse()?,
        model: r.get(3),
        epochs: r.get(4),
        state: r.get(5),
        node: r.get(6),
        epoch: r.get(7),
        version: r.get(8),
        lease_until: r.get(9),
        attempts: r.get(10),
        not_before: r.get(11),
        reason: r.get(12),
        snapshot_key: r.get(13),
        metrics: r.get(14),
        created_at: r.get(15),
        updated_at: r.get(16),
    })
}

/// The database handle.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Checks that `name` can be a column of `aggregated_data` (and so be
/// written into SQL as it is): lowercase ASCII letters, digits and `_`,
/// starting with a letter, at most 63 bytes (PostgreSQL's identifier limit).
pub fn check_column_name(name: &str) -> Result<()> {
    let ok = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "feature column",
            format!("`{name}` is not a column name (a-z, 0-9 and _, starting with a letter, at most 63 bytes)"),
        ))
    }
}

/// The key columns of `aggregated_data`; every other column is a feature.
const AGG_KEYS: [&str; 3] = ["ticker", "interval", "ts"];

impl Db {
    /// Connects to PostgreSQL and migrates. The error names the server and
    /// the script that starts it.
    pub async fn connect_postgres(cfg: &PostgresConfig) -> Result<Self> {
        let opts = PgConnectOptions::new()
            .host(&cfg.host)
            .port(cfg.port)
            .database(&cfg.db)
            .username(&cfg.user)
            .password(&cfg.password);
        let pool = PgPoolOptions::new()
            .max_connections(cfg.max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(Error::db(format!(
                "cannot reach PostgreSQL at {}:{}/{} (scripts/services.sh up starts it)",
                cfg.host, cfg.port, cfg.db
            )))?;
        let db = Db::Postgres(pool);
        db.migrate().await?;
        Ok(db)
    }

    /// Opens (creating) a SQLite file and migrates.
    pub async fn open_sqlite(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))
            .map_err(Error::db(format!("sqlite path {}", path.display())))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(Error::db(format!("open sqlite {}", path.display())))?;
        let db = Db::Sqlite(pool);
        db.migrate().await?;
        Ok(db)
    }

    pub(crate) fn sql(&self, s: &str) -> String {
        match self {
            Db::Postgres(_) => s.to_string(),
            Db::Sqlite(_) => s.replace('$', "?"),
        }
    }

    /// Creates the tables when missing.
    pub async fn migrate(&self) -> Result<()> {
        let (ts, real, json) = match self {
            Db::Postgres(_) => ("TIMESTAMPTZ", "DOUBLE PRECISION", "TEXT"),
            Db::Sqlite(_) => ("TEXT", "REAL", "TEXT"),
        };
        let features: String = FeatureConfig::default()
            .columns()
            .iter()
            .map(|c| format!("{c} {real}, "))
            .collect();
        let ddl = [
            "CREATE TABLE IF NOT EXISTS companies_info (ticker TEXT PRIMARY KEY, name TEXT, active BOOLEAN NOT NULL DEFAULT TRUE)".to_string(),
            format!(
                "CREATE TABLE IF NOT EXISTS aggregated_data (ticker TEXT NOT NULL, \"interval\" TEXT NOT NULL, ts {ts} NOT NULL, {features}PRIMARY KEY (ticker, \"interval\", ts))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS model_versions (ticker TEXT NOT NULL, \"interval\" TEXT NOT NULL, version BIGINT NOT NULL, kind TEXT NOT NULL, uri TEXT NOT NULL, sha256 TEXT NOT NULL, metrics {json} NOT NULL, status TEXT NOT NULL, created_at {ts} NOT NULL, PRIMARY KEY (ticker, \"interval\", version))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS assignments (ticker TEXT NOT NULL, \"interval\" TEXT NOT NULL, node TEXT NOT NULL, epoch BIGINT NOT NULL, lease_until {ts} NOT NULL, PRIMARY KEY (ticker, \"interval\"))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, ticker TEXT NOT NULL, \"interval\" TEXT NOT NULL, model TEXT, epochs BIGINT, state TEXT NOT NULL, node TEXT, epoch BIGINT NOT NULL, version BIGINT NOT NULL, lease_until {ts}, attempts BIGINT NOT NULL, not_before {ts} NOT NULL, reason TEXT NOT NULL, snapshot_key TEXT NOT NULL, metrics {json} NOT NULL, created_at {ts} NOT NULL, updated_at {ts} NOT NULL)"
            ),
            "CREATE INDEX IF NOT EXISTS jobs_open ON jobs (state, created_at)".to_string(),
            format!(
                "CREATE TABLE IF NOT EXISTS node_states (node TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at {ts} NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS ingest_watermarks (source TEXT NOT NULL, key TEXT NOT NULL, through {ts} NOT NULL, writes BIGINT NOT NULL, updated_at {ts} NOT NULL, PRIMARY KEY (source, key))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS aggregate_marks (ticker TEXT NOT NULL, \"interval\" TEXT NOT NULL, version BIGINT NOT NULL, through {ts} NOT NULL, PRIMARY KEY (ticker, \"interval\"))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS aggregate_requests (id TEXT PRIMARY KEY, trigger TEXT NOT NULL, tickers TEXT NOT NULL, \"interval\" TEXT NOT NULL, state TEXT NOT NULL, outcome TEXT NOT NULL, node TEXT NOT NULL, attempts BIGINT NOT NULL, lease_until {ts} NOT NULL, created_at {ts} NOT NULL, updated_at {ts} NOT NULL)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS live_errors (ticker TEXT NOT NULL, \"interval\" TEXT NOT NULL, version BIGINT NOT NULL, bars BIGINT NOT NULL, rmse {real} NOT NULL, through {ts} NOT NULL, updated_at {ts} NOT NULL, PRIMARY KEY (ticker, \"interval\", version))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS model_events (id TEXT PRIMARY KEY, ticker TEXT NOT NULL, \"interval\" TEXT NOT NULL, version BIGINT NOT NULL, kind TEXT NOT NULL, node TEXT NOT NULL, detail TEXT NOT NULL, at {ts} NOT NULL)"
            ),
            "CREATE INDEX IF NOT EXISTS model_events_at ON model_events (at)".to_string(),
            "CREATE TABLE IF NOT EXISTS ingest_members (grp TEXT NOT NULL, topic TEXT NOT NULL, member TEXT NOT NULL, expires_ms BIGINT NOT NULL, PRIMARY KEY (grp, topic, member))".to_string(),
            "CREATE TABLE IF NOT EXISTS ingest_leases (grp TEXT NOT NULL, topic TEXT NOT NULL, part BIGINT NOT NULL, owner TEXT NOT NULL, epoch BIGINT NOT NULL, expires_ms BIGINT NOT NULL, PRIMARY KEY (grp, topic, part))".to_string(),
            format!(
                "CREATE TABLE IF NOT EXISTS job_attempts (job_id TEXT NOT NULL, epoch BIGINT NOT NULL, attempt BIGINT NOT NULL, ticker TEXT NOT NULL, \"interval\" TEXT NOT NULL, node TEXT NOT NULL, version BIGINT NOT NULL, assigned_at {ts} NOT NULL, ended_at {ts}, outcome TEXT NOT NULL, reason TEXT NOT NULL, PRIMARY KEY (job_id, epoch))"
            ),
        ];
        match self {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(Error::db("migrate"))?;
                // Serialise concurrent migrations (several nodes starting at once).
                sqlx::query("SELECT pg_advisory_xact_lock(7305)")
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db("migrate lock"))?;
                for d in &ddl {
                    sqlx::query(d)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db("migrate"))?;
                }
                tx.commit().await.map_err(Error::db("migrate"))?;
            }
            Db::Sqlite(pool) => {
                for d in &ddl {
                    sqlx::query(d)
                        .execute(pool)
                        .await
                        .map_err(Error::db("migrate"))?;
                }
            }
        }
        Ok(())
    }

    /// Marks tickers active in `companies_info`.
    pub async fn upsert_companies(&self, tickers: &[String]) -> Result<()> {
        let q = self.sql("INSERT INTO companies_info (ticker, active) VALUES ($1, TRUE) ON CONFLICT (ticker) DO UPDATE SET active = TRUE");
        for t in tickers {
            match self {
                Db::Postgres(p) => sqlx::query(&q).bind(t).execute(p).await.map(|_| ()),
                Db::Sqlite(p) => sqlx::query(&q).bind(t).execute(p).await.map(|_| ()),
            }
            .map_err(Error::db("upsert companies_info"))?;
        }
        Ok(())
    }

    /// The active tickers of `companies_info`, sorted.
    pub async fn active_companies(&self) -> Result<Vec<String>> {
        let q = self.sql("SELECT ticker FROM companies_info WHERE active ORDER BY ticker");
        match self {
            Db::Postgres(p) => sqlx::query_scalar::<_, String>(&q).fetch_all(p).await,
            Db::Sqlite(p) => sqlx::query_scalar::<_, String>(&q).fetch_all(p).await,
        }
        .map_err(Error::db("read companies_info"))
    }

    /// The feature columns `aggregated_data` has (every column but the key).
    pub async fn aggregated_columns(&self) -> Result<Vec<String>> {
        let ctx = "list the columns of aggregated_data";
        let names: Vec<String> = match self {
            Db::Postgres(p) => sqlx::query_scalar(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'aggregated_data' ORDER BY ordinal_position",
            )
            .fetch_all(p)
            .await
            .map_err(Error::db(ctx))?,
            Db::Sqlite(p) => sqlx::query_scalar("SELECT name FROM pragma_table_info('aggregated_data') ORDER BY cid")
                .fetch_all(p)
                .await
                .map_err(Error::db(ctx))?,
        };
        Ok(names
            .into_iter()
            .filter(|n| !AGG_KEYS.contains(&n.as_str()))
            .collect())
    }

    /// Adds the `columns` that `aggregated_data` lacks (nullable doubles):
    /// other periods in `[features]` or joined series add columns; none are
    /// ever dropped. Safe to run from several processes at once.
    pub async fn ensure_aggregated_columns(&self, columns: &[String]) -> Result<()> {
        for c in columns {
            check_column_name(c)?;
        }
        let have = self.aggregated_columns().await?;
        for c in columns.iter().filter(|c| !have.contains(c)) {
            let ctx = format!("add column {c} to aggregated_data");
            let done = match self {
                Db::Postgres(p) => sqlx::query(&format!(
                    "ALTER TABLE aggregated_data ADD COLUMN IF NOT EXISTS {c} DOUBLE PRECISION"
                ))
                .execute(p)
                .await
                .map(|_| ()),
                Db::Sqlite(p) => {
                    sqlx::query(&format!("ALTER TABLE aggregated_data ADD COLUMN {c} REAL"))
                        .execute(p)
                        .await
                        .map(|_| ())
                }
            };
            // Another process may have added it in between (SQLite has no IF NOT EXISTS here).
            if let Err(e) = done {
                if !self.aggregated_columns().await?.contains(c) {
                    return Err(Error::db(ctx)(e));
                }
            }
        }
        Ok(())
    }

    /// Reads `columns` of one ticker-interval in time order; with `after`,
    /// only the rows after that time.
    pub async fn read_aggregated(
        &self,
        ticker: &str,
        interval: Interval,
        columns: &[String],
        after: Option<DateTime<Utc>>,
    ) -> Result<Vec<AggRow>> {
        for c in columns {
            check_column_name(c)?;
        }
        let ctx = format!("read aggregated_data {ticker} {interval}");
        // Before any market data (and inside PostgreSQL's timestamp range).
        let after = after.unwrap_or_else(|| {
            DateTime::from_timestamp(-5_364_662_400, 0).expect("1800-01-01 is a valid time")
        });
        let sql = self.sql(&format!(
            "SELECT ts, {} FROM aggregated_data WHERE ticker = $1 AND \"interval\" = $2 AND ts > $3 ORDER BY ts",
            columns.join(", ")
        ));
        let decode = |ts: DateTime<Utc>, get: &dyn Fn(usize) -> Option<f64>| AggRow {
            ts,
            values: (0..columns.len()).map(|i| get(i + 1)).collect(),
        };
        let rows = match self {
            Db::Postgres(p) => sqlx::query(&sql)
                .bind(ticker)
                .bind(interval.as_str())
                .bind(after)
                .fetch_all(p)
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|r| decode(r.get(0), &|i| r.get::<Option<f64>, _>(i)))
                        .collect()
                }),
            Db::Sqlite(p) => sqlx::query(&sql)
                .bind(ticker)
                .bind(interval.as_str())
                .bind(after)
                .fetch_all(p)
                .await
                .map(|rows| {
                    rows.iter()
                        .map(|r| decode(r.get(0), &|i| r.get::<Option<f64>, _>(i)))
                        .collect()
                }),
        };
        match rows {
            Ok(rows) => Ok(rows),
            // The catalog is read only when the query fails (not on every
            // forecast's read), to say which column is missing.
            Err(e) => {
                let have = self.aggregated_columns().await?;
                match columns.iter().find(|c| !have.contains(c)) {
                    Some(c) => Err(Error::invalid(
                        "feature column",
                        format!(
                            "`{c}` is not a column of aggregated_data (it has {}); aggregate with the [features] periods that name it",
                            have.join(", ")
                        ),
                    )),
                    None => Err(Error::db(ctx)(e)),
                }
            }
        }
    }

    /// How many `aggregated_data` rows a ticker-interval has.
    /// The last `n` closes of a series, oldest first (charts).
    pub async fn recent_closes(
        &self,
        ticker: &str,
        interval: Interval,
        n: i64,
    ) -> Result<Vec<(DateTime<Utc>, f64)>> {
        let sql = self.sql(
            "SELECT ts, close FROM aggregated_data WHERE ticker = $1 AND \"interval\" = $2 AND close IS NOT NULL ORDER BY ts DESC LIMIT $3",
        );
        let ctx = format!("read the closes of {ticker} {interval}");
        macro_rules! fetch {
            ($pool:expr) => {{
                let rows = sqlx::query(&sql)
                    .bind(ticker)
                    .bind(interval.as_str())
                    .bind(n)
                    .fetch_all($pool)
                    .await
                    .map_err(Error::db(ctx))?;
                rows.iter().rev().map(|r| (r.get(0), r.get(1))).collect()
            }};
        }
        Ok(match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        })
    }

    /// Records a model event.
    pub async fn record_model_event(&self, e: &ModelEventRow) -> Result<()> {
        let sql = self.sql(
            "INSERT INTO model_events (id, ticker, \"interval\", version, kind, node, detail, at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        );
        let id = format!(
            "{:016x}-{:08x}",
            e.at.timestamp_micros(),
            rand::random::<u32>()
        );
        let ctx = format!(
            "record the {} event of {} {} v{}",
            e.kind, e.ticker, e.interval, e.version
        );
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(&id)
                    .bind(&e.ticker)
                    .bind(e.interval.as_str())
                    .bind(e.version)
                    .bind(&e.kind)
                    .bind(&e.node)
                    .bind(&e.detail)
                    .bind(e.at)
                    .execute($pool)
                    .await
                    .map_err(Error::db(ctx))?
                    .rows_affected()
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        };
        Ok(())
    }

    /// The newest model events first, of `ticker` (and `interval`) when
    /// given, at most `limit`.
    pub async fn model_events(
        &self,
        ticker: Option<&str>,
        interval: Option<Interval>,
        limit: i64,
    ) -> Result<Vec<ModelEventRow>> {
        let sql = self.sql(
            "SELECT ticker, \"interval\", version, kind, node, detail, at FROM model_events WHERE ($1 = '' OR ticker = $1) AND ($2 = '' OR \"interval\" = $2) ORDER BY at DESC, id DESC LIMIT $3",
        );
        macro_rules! fetch {
            ($pool:expr) => {{
                let rows = sqlx::query(&sql)
                    .bind(ticker.unwrap_or(""))
                    .bind(interval.map_or("", Interval::as_str))
                    .bind(limit)
                    .fetch_all($pool)
                    .await
                    .map_err(Error::db("read model_events"))?;
                rows.iter()
                    .map(|r| {
                        let interval: String = r.get(1);
                        Ok(ModelEventRow {
                            ticker: r.get(0),
                            interval: interval.parse()?,
                            version: r.get(2),
                            kind: r.get(3),
                            node: r.get(4),
                            detail: r.get(5),
                            at: r.get(6),
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            }};
        }
        match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        }
    }

    /// Records a served version's one-step error on the stored bars after
    /// its training data (a serve node's predictor; the retrain policy
    /// reads it for drift).
    pub async fn record_live_error(&self, e: &LiveError) -> Result<()> {
        let sql = self.sql(
            "INSERT INTO live_errors (ticker, \"interval\", version, bars, rmse, through, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (ticker, \"interval\", version) DO UPDATE SET bars = excluded.bars, rmse = excluded.rmse, through = excluded.through, updated_at = excluded.updated_at",
        );
        let ctx = format!(
            "record the live error of {} {} v{}",
            e.ticker, e.interval, e.version
        );
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(&e.ticker)
                    .bind(e.interval.as_str())
                    .bind(e.version)
                    .bind(e.bars)
                    .bind(e.rmse)
                    .bind(e.through)
                    .bind(Utc::now())
                    .execute($pool)
                    .await
                    .map_err(Error::db(ctx))?
                    .rows_affected()
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        };
        Ok(())
    }

    /// The live error recorded for a version, if any.
    pub async fn live_error(
        &self,
        ticker: &str,
        interval: Interval,
        version: i64,
    ) -> Result<Option<LiveError>> {
        let sql = self.sql(
            "SELECT bars, rmse, through FROM live_errors WHERE ticker = $1 AND \"interval\" = $2 AND version = $3",
        );
        let ctx = format!("read the live error of {ticker} {interval} v{version}");
        macro_rules! fetch {
            ($pool:expr) => {{
                sqlx::query(&sql)
                    .bind(ticker)
                    .bind(interval.as_str())
                    .bind(version)
                    .fetch_optional($pool)
                    .await
                    .map_err(Error::db(ctx))?
                    .map(|r| LiveError {
                        ticker: ticker.to_string(),
                        interval,
                        version,
                        bars: r.get(0),
                        rmse: r.get(1),
                        through: r.get(2),
                    })
            }};
        }
        Ok(match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        })
    }

    /// Rows of a series stored after `after`.
    pub async fn count_aggregated_after(
        &self,
        ticker: &str,
        interval: Interval,
        after: DateTime<Utc>,
    ) -> Result<i64> {
        let sql = self.sql(
            "SELECT COUNT(*) FROM aggregated_data WHERE ticker = $1 AND \"interval\" = $2 AND ts > $3",
        );
        let ctx = format!("count aggregated_data {ticker} {interval} after {after}");
        Ok(match self {
            Db::Postgres(p) => sqlx::query_scalar(&sql)
                .bind(ticker)
                .bind(interval.as_str())
                .bind(after)
                .fetch_one(p)
                .await
                .map_err(Error::db(ctx))?,
            Db::Sqlite(p) => sqlx::query_scalar(&sql)
                .bind(ticker)
                .bind(interval.as_str())
                .bind(after)
                .fetch_one(p)
                .await
                .map_err(Error::db(ctx))?,
        })
    }

    pub async fn count_aggregated(&self, ticker: &str, interval: Interval) -> Result<i64> {
        let sql = self
            .sql("SELECT COUNT(*) FROM aggregated_data WHERE ticker = $1 AND \"interval\" = $2");
        let ctx = format!("count aggregated_data {ticker} {interval}");
        let n: i64 = match self {
            Db::Postgres(p) => sqlx::query_scalar(&sql)
                .bind(ticker)
                .bind(interval.as_str())
                .fetch_one(p)
                .await
                .map_err(Error::db(ctx))?,
            Db::Sqlite(p) => sqlx::query_scalar(&sql)
                .bind(ticker)
                .bind(interval.as_str())
                .fetch_one(p)
                .await
                .map_err(Error::db(ctx))?,
        };
        Ok(n)
    }

    /// Removes a ticker-interval's rows from `from` on (before re-aggregating
    /// from that point); returns how many went.
    pub async fn delete_aggregated_from(
        &self,
        ticker: &str,
        interval: Interval,
        from: DateTime<Utc>,
    ) -> Result<u64> {
        let sql = self.sql(
            "DELETE FROM aggregated_data WHERE ticker = $1 AND \"interval\" = $2 AND ts >= $3",
        );
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(ticker)
                    .bind(interval.as_str())
                    .bind(from)
                    .execute($pool)
                    .await
                    .map(|r| r.rows_affected())
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(format!(
            "delete aggregated_data {ticker} {interval} from {from}"
        )))
    }

    /// Records a model version; the previous champion of the same
    /// ticker-interval becomes `retired` when `m.status` is `champion`.
    pub async fn insert_model_version(&self, m: &ModelVersion) -> Result<()> {
        let retire = self.sql("UPDATE model_versions SET status = 'retired' WHERE ticker = $1 AND \"interval\" = $2 AND status = 'champion'");
        let insert = self.sql("INSERT INTO model_versions (ticker, \"interval\", version, kind, uri, sha256, metrics, status, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (ticker, \"interval\", version) DO UPDATE SET kind = EXCLUDED.kind, uri = EXCLUDED.uri, sha256 = EXCLUDED.sha256, metrics = EXCLUDED.metrics, status = EXCLUDED.status");
        let ctx = format!(
            "insert model_versions {} {} v{}",
            m.ticker, m.interval, m.version
        );
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.map_err(Error::db(ctx.clone()))?;
                if m.status == "champion" {
                    sqlx::query(&retire)
                        .bind(&m.ticker)
                        .bind(m.interval.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx.clone()))?;
                }
                sqlx::query(&insert)
                    .bind(&m.ticker)
                    .bind(m.interval.as_str())
                    .bind(m.version)
                    .bind(&m.kind)
                    .bind(&m.uri)
                    .bind(&m.sha256)
                    .bind(&m.metrics)
                    .bind(&m.status)
                    .bind(m.created_at)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                tx.commit().await.map_err(Error::db(ctx))?;
            }};
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        Ok(())
    }

    /// The current champion of every ticker-interval.
    pub async fn champions(&self) -> Result<Vec<ModelVersion>> {
        self.models(None, None, false).await
    }

    /// Registered versions, by ticker, interval and version: champions only
    /// unless `all`, of one ticker and interval when given.
    pub async fn models(
        &self,
        ticker: Option<&str>,
        interval: Option<Interval>,
        all: bool,
    ) -> Result<Vec<ModelVersion>> {
        let status = if all { "" } else { " AND status = 'champion'" };
        let sql = self.sql(&format!(
            "SELECT {MODEL_COLUMNS} FROM model_versions WHERE ($1 = '' OR ticker = $1) AND ($2 = '' OR \"interval\" = $2){status} ORDER BY ticker, \"interval\", version"
        ));
        let (t, i) = (ticker.unwrap_or(""), interval.map_or("", |i| i.as_str()));
        macro_rules! fetch {
            ($pool:expr) => {{
                let rows = sqlx::query(&sql)
                    .bind(t)
                    .bind(i)
                    .fetch_all($pool)
                    .await
                    .map_err(Error::db("read model_versions"))?;
                rows.iter().map(model_of_row).collect::<Result<Vec<_>>>()
            }};
        }
        match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        }
    }

    /// Makes `version` the champion of its ticker-interval (the current one
    /// is retired), in one transaction. NotFound for an unregistered version.
    pub async fn promote(
        &self,
        ticker: &str,
        interval: Interval,
        version: i64,
    ) -> Result<ModelVersion> {
        self.swap_champion(ticker, interval, Some(version)).await
    }

    /// Puts back the newest retired version older than the champion; the
    /// champion becomes `rolled_back` (so a second rollback goes further
    /// back). NotFound without a champion or an earlier version.
    pub async fn rollback(&self, ticker: &str, interval: Interval) -> Result<ModelVersion> {
        self.swap_champion(ticker, interval, None).await
    }

    async fn swap_champion(
        &self,
        ticker: &str,
        interval: Interval,
        to: Option<i64>,
    ) -> Result<ModelVersion> {
        let champion_sql = self.sql("SELECT version FROM model_versions WHERE ticker = $1 AND \"interval\" = $2 AND status = 'champion'");
        let exists_sql = self.sql("SELECT version FROM model_versions WHERE ticker = $1 AND \"interval\" = $2 AND version = $3");
        let previous_sql = self.sql("SELECT MAX(version) FROM model_versions WHERE ticker = $1 AND \"interval\" = $2 AND status = 'retired' AND version < $3");
        let status_sql = self.sql("UPDATE model_versions SET status = $4 WHERE ticker = $1 AND \"interval\" = $2 AND version = $3");
        let read_sql = self.sql(&format!("SELECT {MODEL_COLUMNS} FROM model_versions WHERE ticker = $1 AND \"interval\" = $2 AND version = $3"));
        let ctx = format!("change the champion of {ticker} {interval}");
        let iv = interval.as_str();
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.map_err(Error::db(ctx.clone()))?;
                let current: Option<i64> = sqlx::query_scalar(&champion_sql)
                    .bind(ticker)
                    .bind(iv)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let (target, demoted) = match to {
                    Some(v) => {
                        let found: Option<i64> = sqlx::query_scalar(&exists_sql)
                            .bind(ticker)
                            .bind(iv)
                            .bind(v)
                            .fetch_optional(&mut *tx)
                            .await
                            .map_err(Error::db(ctx.clone()))?;
                        if found.is_none() {
                            return Err(Error::NotFound(format!(
                                "version {v} of {ticker} {interval} is not registered"
                            )));
                        }
                        (v, "retired")
                    }
                    None => {
                        let cur = current.ok_or_else(|| {
                            Error::NotFound(format!("{ticker} {interval} has no champion to roll back"))
                        })?;
                        let prev: Option<i64> = sqlx::query_scalar(&previous_sql)
                            .bind(ticker)
                            .bind(iv)
                            .bind(cur)
                            .fetch_one(&mut *tx)
                            .await
                            .map_err(Error::db(ctx.clone()))?;
                        let prev = prev.ok_or_else(|| {
                            Error::NotFound(format!(
                                "{ticker} {interval} has no retired version older than its champion v{cur}"
                            ))
                        })?;
                        (prev, "rolled_back")
                    }
                };
                if let Some(cur) = current.filter(|c| *c != target) {
                    sqlx::query(&status_sql)
                        .bind(ticker)
                        .bind(iv)
                        .bind(cur)
                        .bind(demoted)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx.clone()))?;
                }
                sqlx::query(&status_sql)
                    .bind(ticker)
                    .bind(iv)
                    .bind(target)
                    .bind("champion")
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let row = sqlx::query(&read_sql)
                    .bind(ticker)
                    .bind(iv)
                    .bind(target)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let m = model_of_row(&row)?;
                tx.commit().await.map_err(Error::db(ctx))?;
                Ok(m)
            }};
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
    }

    /// Remembers an operator's state of a node (`cordoned`, `draining`);
    /// `None` forgets it (the node is ready).
    pub async fn set_node_state(&self, node: &str, state: Option<&str>) -> Result<()> {
        let sql = match state {
            Some(_) => self.sql("INSERT INTO node_states (node, state, updated_at) VALUES ($1, $2, $3) ON CONFLICT (node) DO UPDATE SET state = EXCLUDED.state, updated_at = EXCLUDED.updated_at"),
            None => self.sql("DELETE FROM node_states WHERE node = $1"),
        };
        macro_rules! run {
            ($pool:expr) => {{
                let q = sqlx::query(&sql).bind(node);
                let q = match state {
                    Some(s) => q.bind(s).bind(Utc::now()),
                    None => q,
                };
                q.execute($pool).await.map(|_| ())
            }};
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(format!("record the state of node {node}")))
    }

    /// Every node state an operator set: `(node, state)`.
    pub async fn node_states(&self) -> Result<Vec<(String, String)>> {
        let sql = "SELECT node, state FROM node_states ORDER BY node";
        macro_rules! fetch {
            ($pool:expr) => {{
                let rows = sqlx::query(sql)
                    .fetch_all($pool)
                    .await
                    .map_err(Error::db("read node_states"))?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            }};
        }
        match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        }
    }

    /// The newest jobs first, in `states` (all when empty; each one of
    /// queued, assigned, done, failed), of `ticker` when given, at most `limit`.
    pub async fn recent_jobs(
        &self,
        states: &[String],
        ticker: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobRow>> {
        const STATES: [&str; 4] = ["queued", "assigned", "done", "failed"];
        let mut known = Vec::new();
        for st in states {
            let Some(k) = STATES.iter().find(|k| **k == st) else {
                return Err(Error::invalid(
                    "job state",
                    format!("`{st}` is not one of {}", STATES.join(", ")),
                ));
            };
            known.push(format!("'{k}'"));
        }
        let filter = if known.is_empty() {
            String::new()
        } else {
            format!(" AND state IN ({})", known.join(", "))
        };
        let sql = self.sql(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1 = '' OR ticker = $1){filter} ORDER BY created_at DESC, id DESC LIMIT $2"
        ));
        let t = ticker.unwrap_or("");
        macro_rules! fetch {
            ($pool:expr) => {{
                let rows = sqlx::query(&sql)
                    .bind(t)
                    .bind(limit)
                    .fetch_all($pool)
                    .await
                    .map_err(Error::db("read jobs"))?;
                rows.iter().map(job_of_row).collect::<Result<Vec<_>>>()
            }};
        }
        match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        }
    }

    /// Writes a job's row (insert or replace).
    pub async fn upsert_job(&self, j: &JobRow) -> Result<()> {
        let sql = self.sql(&format!(
            "INSERT INTO jobs ({JOB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) ON CONFLICT (id) DO UPDATE SET model = EXCLUDED.model, epochs = EXCLUDED.epochs, state = EXCLUDED.state, node = EXCLUDED.node, epoch = EXCLUDED.epoch, version = EXCLUDED.version, lease_until = EXCLUDED.lease_until, attempts = EXCLUDED.attempts, not_before = EXCLUDED.not_before, reason = EXCLUDED.reason, snapshot_key = EXCLUDED.snapshot_key, metrics = EXCLUDED.metrics, updated_at = EXCLUDED.updated_at"
        ));
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(&j.id)
                    .bind(&j.ticker)
                    .bind(j.interval.as_str())
                    .bind(&j.model)
                    .bind(j.epochs)
                    .bind(&j.state)
                    .bind(&j.node)
                    .bind(j.epoch)
                    .bind(j.version)
                    .bind(j.lease_until)
                    .bind(j.attempts)
                    .bind(j.not_before)
                    .bind(&j.reason)
                    .bind(&j.snapshot_key)
                    .bind(&j.metrics)
                    .bind(j.created_at)
                    .bind(j.updated_at)
                    .execute($pool)
                    .await
                    .map(|_| ())
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(format!("write job {}", j.id)))
    }

    /// Jobs in `states` (every job when empty), oldest first, at most `limit`.
    pub async fn jobs(&self, states: &[&str], limit: i64) -> Result<Vec<JobRow>> {
        let filter = if states.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = states
                .iter()
                .map(|s| format!("'{}'", s.replace('\'', "")))
                .collect();
            format!(" WHERE state IN ({})", list.join(", "))
        };
        let sql = self.sql(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs{filter} ORDER BY created_at, id LIMIT $1"
        ));
        macro_rules! fetch {
            ($pool:expr) => {{
                let rows = sqlx::query(&sql)
                    .bind(limit)
                    .fetch_all($pool)
                    .await
                    .map_err(Error::db("read jobs"))?;
                rows.iter().map(job_of_row).collect::<Result<Vec<_>>>()
            }};
        }
        match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        }
    }

    /// One job by id.
    pub async fn job(&self, id: &str) -> Result<Option<JobRow>> {
        let sql = self.sql(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"));
        macro_rules! fetch {
            ($pool:expr) => {{
                let row = sqlx::query(&sql)
                    .bind(id)
                    .fetch_optional($pool)
                    .await
                    .map_err(Error::db(format!("read job {id}")))?;
                row.as_ref().map(job_of_row).transpose()
            }};
        }
        match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        }
    }

    /// Assigns a job to `node` in one transaction: the next assignment epoch
    /// of its ticker-interval, a version no attempt or model has used, the
    /// lease, one more attempt; `assignments` records the same. `j` is
    /// updated to what was written.
    pub async fn assign_job(
        &self,
        j: &mut JobRow,
        node: &str,
        lease_until: DateTime<Utc>,
    ) -> Result<()> {
        let epoch_sql = self.sql("SELECT COALESCE(MAX(epoch), 0) FROM assignments WHERE ticker = $1 AND \"interval\" = $2");
        let version_sql = self.sql("SELECT COALESCE(MAX(v), 0) FROM (SELECT MAX(version) AS v FROM model_versions WHERE ticker = $1 AND \"interval\" = $2 UNION ALL SELECT MAX(version) AS v FROM jobs WHERE ticker = $1 AND \"interval\" = $2) AS t");
        let assign_sql = self.sql("INSERT INTO assignments (ticker, \"interval\", node, epoch, lease_until) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (ticker, \"interval\") DO UPDATE SET node = EXCLUDED.node, epoch = EXCLUDED.epoch, lease_until = EXCLUDED.lease_until");
        let job_sql = self.sql("UPDATE jobs SET state = 'assigned', node = $2, epoch = $3, version = $4, lease_until = $5, attempts = attempts + 1, updated_at = $6 WHERE id = $1 AND state = 'queued'");
        let attempt_sql = self.sql("INSERT INTO job_attempts (job_id, epoch, attempt, ticker, \"interval\", node, version, assigned_at, ended_at, outcome, reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, 'running', '')");
        let ctx = format!("assign job {} to {node}", j.id);
        let now = Utc::now();
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.map_err(Error::db(ctx.clone()))?;
                let epoch: i64 = sqlx::query_scalar(&epoch_sql)
                    .bind(&j.ticker)
                    .bind(j.interval.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let version: i64 = sqlx::query_scalar(&version_sql)
                    .bind(&j.ticker)
                    .bind(j.interval.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let (epoch, version) = (epoch + 1, version + 1);
                sqlx::query(&assign_sql)
                    .bind(&j.ticker)
                    .bind(j.interval.as_str())
                    .bind(node)
                    .bind(epoch)
                    .bind(lease_until)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let n = sqlx::query(&job_sql)
                    .bind(&j.id)
                    .bind(node)
                    .bind(epoch)
                    .bind(version)
                    .bind(lease_until)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?
                    .rows_affected();
                if n != 1 {
                    return Err(Error::Conflict(format!(
                        "job {} is not queued in the database",
                        j.id
                    )));
                }
                sqlx::query(&attempt_sql)
                    .bind(&j.id)
                    .bind(epoch)
                    .bind(j.attempts + 1)
                    .bind(&j.ticker)
                    .bind(j.interval.as_str())
                    .bind(node)
                    .bind(version)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                tx.commit().await.map_err(Error::db(ctx))?;
                (epoch, version)
            }};
        }
        let (epoch, version) = match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        };
        j.state = "assigned".into();
        j.node = Some(node.to_string());
        j.epoch = epoch;
        j.version = version;
        j.lease_until = Some(lease_until);
        j.attempts += 1;
        j.updated_at = now;
        Ok(())
    }

    /// Extends the leases of `node`'s assigned jobs among `ids` to `until`
    /// (in `jobs` and `assignments`).
    pub async fn renew_leases(
        &self,
        node: &str,
        ids: &[String],
        until: DateTime<Utc>,
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let job = self.sql(
            "UPDATE jobs SET lease_until = $1 WHERE id = $2 AND node = $3 AND state = 'assigned'",
        );
        let assignment = self.sql("UPDATE assignments SET lease_until = $1 WHERE node = $2 AND (ticker, \"interval\", epoch) IN (SELECT ticker, \"interval\", epoch FROM jobs WHERE id = $3 AND state = 'assigned')");
        let ctx = format!("renew the leases of {node}");
        macro_rules! run {
            ($pool:expr) => {{
                let mut tx = $pool.begin().await.map_err(Error::db(ctx.clone()))?;
                for id in ids {
                    sqlx::query(&job)
                        .bind(until)
                        .bind(id)
                        .bind(node)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx.clone()))?;
                    sqlx::query(&assignment)
                        .bind(until)
                        .bind(node)
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx.clone()))?;
                }
                tx.commit().await.map_err(Error::db(ctx))
            }};
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
    }

    /// The tickers among `tickers` that have `aggregated_data` rows for
    /// `interval` (one query).
    pub async fn tickers_with_data(
        &self,
        interval: Interval,
        tickers: &[String],
    ) -> Result<std::collections::HashSet<String>> {
        let mut out = std::collections::HashSet::new();
        for chunk in tickers.chunks(500) {
            let marks: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = self.sql(&format!(
                "SELECT DISTINCT ticker FROM aggregated_data WHERE \"interval\" = $1 AND ticker IN ({})",
                marks.join(", ")
            ));
            macro_rules! fetch {
                ($pool:expr) => {{
                    let mut q = sqlx::query_scalar::<_, String>(&sql).bind(interval.as_str());
                    for t in chunk {
                        q = q.bind(t);
                    }
                    q.fetch_all($pool).await
                }};
            }
            let found = match self {
                Db::Postgres(p) => fetch!(p),
                Db::Sqlite(p) => fetch!(p),
            }
            .map_err(Error::db("look up tickers in aggregated_data"))?;
            out.extend(found);
        }
        Ok(out)
    }

    /// Ends the attempt of `job_id` under `epoch` with `outcome` (`done` or `ended`).
    pub async fn close_attempt(
        &self,
        job_id: &str,
        epoch: i64,
        outcome: &str,
        reason: &str,
    ) -> Result<()> {
        let sql = self.sql("UPDATE job_attempts SET ended_at = $1, outcome = $2, reason = $3 WHERE job_id = $4 AND epoch = $5 AND ended_at IS NULL");
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(Utc::now())
                    .bind(outcome)
                    .bind(reason)
                    .bind(job_id)
                    .bind(epoch)
                    .execute($pool)
                    .await
                    .map(|_| ())
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(format!("close attempt {job_id} epoch {epoch}")))
    }

    /// The attempts of a ticker-interval's jobs, in epoch order.
    pub async fn attempts(&self, ticker: &str, interval: Interval) -> Result<Vec<AttemptRow>> {
        let sql = self.sql("SELECT job_id, epoch, attempt, ticker, \"interval\", node, version, assigned_at, ended_at, outcome, reason FROM job_attempts WHERE ticker = $1 AND \"interval\" = $2 ORDER BY epoch");
        macro_rules! fetch {
            ($pool:expr) => {{
                let rows = sqlx::query(&sql)
                    .bind(ticker)
                    .bind(interval.as_str())
                    .fetch_all($pool)
                    .await
                    .map_err(Error::db(format!("read attempts of {ticker} {interval}")))?;
                rows.iter()
                    .map(|r| {
                        let interval: String = r.get(4);
                        Ok(AttemptRow {
                            job_id: r.get(0),
                            epoch: r.get(1),
                            attempt: r.get(2),
                            ticker: r.get(3),
                            interval: interval.parse()?,
                            node: r.get(5),
                            version: r.get(6),
                            assigned_at: r.get(7),
                            ended_at: r.get(8),
                            outcome: r.get(9),
                            reason: r.get(10),
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            }};
        }
        match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// Loading rows of other periods adds their columns; reading a column
    /// the table lacks names the ones it has; a bad name is refused before SQL.
    #[tokio::test]
    async fn feature_columns_follow_the_loaded_periods() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("t.db")).await.unwrap();
        let cfg = FeatureConfig {
            sma: 50,
            ..FeatureConfig::default()
        };
        let columns = cfg.columns();
        assert!(!db
            .aggregated_columns()
            .await
            .unwrap()
            .contains(&"sma_50".to_string()));
        let row = AggRow {
            ts: Utc.with_ymd_and_hms(2024, 1, 2, 14, 30, 0).unwrap(),
            values: (0..columns.len()).map(|i| Some(i as f64)).collect(),
        };
        db.load_aggregated("T", Interval::D1, &columns, std::slice::from_ref(&row))
            .await
            .unwrap();
        let have = db.aggregated_columns().await.unwrap();
        assert!(have.contains(&"sma_50".to_string()) && have.contains(&"sma_20".to_string()));
        let read = db
            .read_aggregated("T", Interval::D1, &columns, None)
            .await
            .unwrap();
        assert_eq!(read, vec![row]);
        let e = db
            .read_aggregated("T", Interval::D1, &["rsi_99".to_string()], None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("`rsi_99`") && e.contains("sma_50"), "{e}");
        let e = db
            .read_aggregated("T", Interval::D1, &["close; DROP".to_string()], None)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a column name"), "{e}");
    }
}
