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
use sqlx::{PgPool, QueryBuilder, Row, SqlitePool};

use crate::config::{PostgresConfig, FEATURE_COLUMNS};
use crate::types::Interval;
use crate::{Error, Result};

/// One row of `aggregated_data`: a timestamp and one value per
/// [`FEATURE_COLUMNS`] entry, `None` while an indicator warms up.
#[derive(Debug, Clone, PartialEq)]
pub struct AggRow {
    pub ts: DateTime<Utc>,
    pub values: Vec<Option<f64>>,
}

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

/// The database handle.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

fn col_list() -> String {
    FEATURE_COLUMNS.join(", ")
}

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

    fn sql(&self, s: &str) -> String {
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
        let features: String = FEATURE_COLUMNS
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

    /// Loads one ticker-interval's rows in one transaction (upsert).
    pub async fn load_aggregated(
        &self,
        ticker: &str,
        interval: Interval,
        rows: &[AggRow],
    ) -> Result<u64> {
        let ctx = format!("load aggregated_data {ticker} {interval}");
        for r in rows {
            if r.values.len() != FEATURE_COLUMNS.len() {
                return Err(Error::invalid(
                    "aggregated row",
                    format!(
                        "{} values for {} columns",
                        r.values.len(),
                        FEATURE_COLUMNS.len()
                    ),
                ));
            }
        }
        let updates: String = FEATURE_COLUMNS
            .iter()
            .map(|c| format!("{c} = EXCLUDED.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        match self {
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(Error::db(ctx.clone()))?;
                sqlx::query("CREATE TEMP TABLE tmp_agg (LIKE aggregated_data) ON COMMIT DROP")
                    .execute(&mut *tx)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let mut csv = String::with_capacity(rows.len() * 160);
                for r in rows {
                    csv.push_str(ticker);
                    csv.push(',');
                    csv.push_str(interval.as_str());
                    csv.push(',');
                    csv.push_str(&r.ts.to_rfc3339());
                    for v in &r.values {
                        csv.push(',');
                        if let Some(v) = v.filter(|v| v.is_finite()) {
                            csv.push_str(&v.to_string());
                        }
                    }
                    csv.push('\n');
                }
                let mut copy = tx
                    .copy_in_raw("COPY tmp_agg FROM STDIN WITH (FORMAT csv)")
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                copy.send(csv.into_bytes())
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                copy.finish().await.map_err(Error::db(ctx.clone()))?;
                let cols = col_list();
                let n = sqlx::query(&format!(
                    "INSERT INTO aggregated_data (ticker, \"interval\", ts, {cols}) SELECT ticker, \"interval\", ts, {cols} FROM tmp_agg ON CONFLICT (ticker, \"interval\", ts) DO UPDATE SET {updates}"
                ))
                .execute(&mut *tx)
                .await
                .map_err(Error::db(ctx.clone()))?
                .rows_affected();
                tx.commit().await.map_err(Error::db(ctx))?;
                Ok(n)
            }
            Db::Sqlite(pool) => {
                let mut tx = pool.begin().await.map_err(Error::db(ctx.clone()))?;
                let mut n = 0;
                let per_row = 3 + FEATURE_COLUMNS.len();
                for chunk in rows.chunks(30_000 / per_row) {
                    let mut qb: QueryBuilder<sqlx::Sqlite> = QueryBuilder::new(format!(
                        "INSERT INTO aggregated_data (ticker, \"interval\", ts, {}) ",
                        col_list()
                    ));
                    qb.push_values(chunk, |mut b, r| {
                        b.push_bind(ticker)
                            .push_bind(interval.as_str())
                            .push_bind(r.ts);
                        for v in &r.values {
                            b.push_bind(v.filter(|v| v.is_finite()));
                        }
                    });
                    qb.push(format!(
                        " ON CONFLICT (ticker, \"interval\", ts) DO UPDATE SET {updates}"
                    ));
                    n += qb
                        .build()
                        .execute(&mut *tx)
                        .await
                        .map_err(Error::db(ctx.clone()))?
                        .rows_affected();
                }
                tx.commit().await.map_err(Error::db(ctx))?;
                Ok(n)
            }
        }
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
        if let Some(c) = columns
            .iter()
            .find(|c| !FEATURE_COLUMNS.contains(&c.as_str()))
        {
            return Err(Error::invalid(
                "feature column",
                format!("`{c}` is not a column of aggregated_data"),
            ));
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
                .map_err(Error::db(ctx))?
                .iter()
                .map(|r| decode(r.get(0), &|i| r.get::<Option<f64>, _>(i)))
                .collect(),
            Db::Sqlite(p) => sqlx::query(&sql)
                .bind(ticker)
                .bind(interval.as_str())
                .bind(after)
                .fetch_all(p)
                .await
                .map_err(Error::db(ctx))?
                .iter()
                .map(|r| decode(r.get(0), &|i| r.get::<Option<f64>, _>(i)))
                .collect(),
        };
        Ok(rows)
    }

    /// How many `aggregated_data` rows a ticker-interval has.
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

    /// Every column of a ticker-interval's rows after `after` (all of them
    /// with `None`), in time order: what a forecaster's history is built from.
    pub async fn read_aggregated_after(
        &self,
        ticker: &str,
        interval: Interval,
        after: Option<DateTime<Utc>>,
    ) -> Result<Vec<AggRow>> {
        let all: Vec<String> = FEATURE_COLUMNS.iter().map(|c| c.to_string()).collect();
        self.read_aggregated(ticker, interval, &all, after).await
    }

    /// The next free version number of a ticker-interval's models.
    pub async fn next_model_version(&self, ticker: &str, interval: Interval) -> Result<i64> {
        let sql = self.sql("SELECT COALESCE(MAX(version), 0) + 1 FROM model_versions WHERE ticker = $1 AND \"interval\" = $2");
        let ctx = "next model version";
        let v: i64 = match self {
            Db::Postgres(p) => {
                sqlx::query_scalar(&sql)
                    .bind(ticker)
                    .bind(interval.as_str())
                    .fetch_one(p)
                    .await
            }
            Db::Sqlite(p) => {
                sqlx::query_scalar(&sql)
                    .bind(ticker)
                    .bind(interval.as_str())
                    .fetch_one(p)
                    .await
            }
        }
        .map_err(Error::db(ctx))?;
        Ok(v)
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
        let sql = "SELECT ticker, \"interval\", version, kind, uri, sha256, metrics, status, created_at FROM model_versions WHERE status = 'champion' ORDER BY ticker, \"interval\"";
        macro_rules! fetch {
            ($pool:expr) => {{
                let rows = sqlx::query(sql)
                    .fetch_all($pool)
                    .await
                    .map_err(Error::db("read champions"))?;
                rows.iter()
                    .map(|r| {
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
                    })
                    .collect::<Result<Vec<_>>>()
            }};
        }
        match self {
            Db::Postgres(p) => fetch!(p),
            Db::Sqlite(p) => fetch!(p),
        }
    }

    /// Records that `node` holds the job of a ticker-interval under `epoch`.
    pub async fn upsert_assignment(
        &self,
        ticker: &str,
        interval: Interval,
        node: &str,
        epoch: i64,
        lease_until: DateTime<Utc>,
    ) -> Result<()> {
        let sql = self.sql("INSERT INTO assignments (ticker, \"interval\", node, epoch, lease_until) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (ticker, \"interval\") DO UPDATE SET node = EXCLUDED.node, epoch = EXCLUDED.epoch, lease_until = EXCLUDED.lease_until");
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(ticker)
                    .bind(interval.as_str())
                    .bind(node)
                    .bind(epoch)
                    .bind(lease_until)
                    .execute($pool)
                    .await
                    .map(|_| ())
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(format!("upsert assignment {ticker} {interval}")))
    }

    /// The highest epoch ever handed out for a ticker-interval (0 if none).
    pub async fn assignment_epoch(&self, ticker: &str, interval: Interval) -> Result<i64> {
        let sql = self.sql("SELECT COALESCE(MAX(epoch), 0) FROM assignments WHERE ticker = $1 AND \"interval\" = $2");
        let v: i64 = match self {
            Db::Postgres(p) => {
                sqlx::query_scalar(&sql)
                    .bind(ticker)
                    .bind(interval.as_str())
                    .fetch_one(p)
                    .await
            }
            Db::Sqlite(p) => {
                sqlx::query_scalar(&sql)
                    .bind(ticker)
                    .bind(interval.as_str())
                    .fetch_one(p)
                    .await
            }
        }
        .map_err(Error::db("read assignment epoch"))?;
        Ok(v)
    }
}
