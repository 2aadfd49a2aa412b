//! The ingest consumers' partition leases, in the database every node of a
//! cluster shares (PostgreSQL; SQLite in embedded mode).
//!
//! Two tables, keyed by consumer group and topic:
//! - `ingest_members`: who consumes (`member`, a node name), each row alive
//!   until `expires_ms`, renewed by the member's heartbeat;
//! - `ingest_leases`: which member owns a partition until `expires_ms`,
//!   with an `epoch` that grows each time the owner changes.
//!
//! Every time is the database's clock (milliseconds since the epoch), so the
//! nodes' clocks do not have to agree. A lease is taken only when it is free,
//! expired, or already the taker's: two members never own a partition at
//! once, as far as the database can tell. A member that stalls longer than
//! its lease stops writing on its own clock (`actors/ingest/src/ownership.rs`).

use sqlx::Row;

use crate::db::Db;
use tickmesh_core::{Error, Result};

/// One partition lease, as [`Db::ingest_leases`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLease {
    pub partition: i32,
    pub owner: String,
    pub epoch: i64,
    /// Milliseconds until it expires (negative: expired).
    pub expires_in_ms: i64,
}

impl Db {
    /// The database's clock in ms since the epoch, as SQL.
    fn now_ms_sql(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Db::Sqlite(_) => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    /// Renews `member`'s membership of (`group`, `topic`) for `ttl_ms` and
    /// returns the live members, sorted (`member` among them).
    pub async fn ingest_heartbeat(
        &self,
        group: &str,
        topic: &str,
        member: &str,
        ttl_ms: i64,
    ) -> Result<Vec<String>> {
        let now = self.now_ms_sql();
        let upsert = self.sql(&format!(
            "INSERT INTO ingest_members (grp, topic, member, expires_ms) VALUES ($1, $2, $3, {now} + $4) ON CONFLICT (grp, topic, member) DO UPDATE SET expires_ms = EXCLUDED.expires_ms"
        ));
        let live = self.sql(&format!(
            "SELECT member FROM ingest_members WHERE grp = $1 AND topic = $2 AND expires_ms > {now} ORDER BY member"
        ));
        let ctx = format!("heartbeat of ingest member {member} on {topic}");
        macro_rules! run {
            ($pool:expr) => {{
                sqlx::query(&upsert)
                    .bind(group)
                    .bind(topic)
                    .bind(member)
                    .bind(ttl_ms)
                    .execute($pool)
                    .await
                    .map_err(Error::db(ctx.clone()))?;
                let rows = sqlx::query(&live)
                    .bind(group)
                    .bind(topic)
                    .fetch_all($pool)
                    .await
                    .map_err(Error::db(ctx))?;
                Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
            }};
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
    }

    /// Takes (or renews) the lease of `partition` for `member` when it is
    /// free, expired or already `member`'s. Returns the lease's epoch, or
    /// `None` when another member holds it.
    pub async fn ingest_acquire(
        &self,
        group: &str,
        topic: &str,
        partition: i32,
        member: &str,
        ttl_ms: i64,
    ) -> Result<Option<i64>> {
        let now = self.now_ms_sql();
        let sql = self.sql(&format!(
            "INSERT INTO ingest_leases (grp, topic, part, owner, epoch, expires_ms) VALUES ($1, $2, $3, $4, 1, {now} + $5) \
             ON CONFLICT (grp, topic, part) DO UPDATE SET \
             epoch = CASE WHEN ingest_leases.owner = EXCLUDED.owner THEN ingest_leases.epoch ELSE ingest_leases.epoch + 1 END, \
             owner = EXCLUDED.owner, expires_ms = EXCLUDED.expires_ms \
             WHERE ingest_leases.owner = EXCLUDED.owner OR ingest_leases.expires_ms <= {now} \
             RETURNING epoch"
        ));
        let ctx = format!("take the lease of {topic} partition {partition} for {member}");
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(group)
                    .bind(topic)
                    .bind(partition as i64)
                    .bind(member)
                    .bind(ttl_ms)
                    .fetch_optional($pool)
                    .await
                    .map(|r| r.map(|r| r.get::<i64, _>(0)))
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(ctx))
    }

    /// Extends every lease `member` still holds on (`group`, `topic`) by
    /// `ttl_ms` and returns their partitions: a partition missing from the
    /// answer was taken over after its lease ran out.
    pub async fn ingest_renew(
        &self,
        group: &str,
        topic: &str,
        member: &str,
        ttl_ms: i64,
    ) -> Result<Vec<i32>> {
        let now = self.now_ms_sql();
        let sql = self.sql(&format!(
            "UPDATE ingest_leases SET expires_ms = {now} + $4 WHERE grp = $1 AND topic = $2 AND owner = $3 AND expires_ms > 0 RETURNING part"
        ));
        let ctx = format!("renew the leases of {member} on {topic}");
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(group)
                    .bind(topic)
                    .bind(member)
                    .bind(ttl_ms)
                    .fetch_all($pool)
                    .await
                    .map(|rows| {
                        let mut v: Vec<i32> =
                            rows.iter().map(|r| r.get::<i64, _>(0) as i32).collect();
                        v.sort_unstable();
                        v
                    })
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(ctx))
    }

    /// Gives up `member`'s leases of `partitions` (all of them, and its
    /// membership too, when `leave`): another member may take them at once.
    pub async fn ingest_release(
        &self,
        group: &str,
        topic: &str,
        member: &str,
        partitions: &[i32],
        leave: bool,
    ) -> Result<()> {
        let release = self.sql(
            "UPDATE ingest_leases SET expires_ms = 0 WHERE grp = $1 AND topic = $2 AND owner = $3 AND part = $4",
        );
        let quit =
            self.sql("DELETE FROM ingest_members WHERE grp = $1 AND topic = $2 AND member = $3");
        let ctx = format!("release the leases of {member} on {topic}");
        macro_rules! run {
            ($pool:expr) => {
                async {
                    for p in partitions {
                        sqlx::query(&release)
                            .bind(group)
                            .bind(topic)
                            .bind(member)
                            .bind(*p as i64)
                            .execute($pool)
                            .await?;
                    }
                    if leave {
                        sqlx::query(&quit)
                            .bind(group)
                            .bind(topic)
                            .bind(member)
                            .execute($pool)
                            .await?;
                    }
                    Ok::<(), sqlx::Error>(())
                }
                .await
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(ctx))
    }

    /// Every partition lease of (`group`, `topic`), by partition.
    pub async fn ingest_leases(&self, group: &str, topic: &str) -> Result<Vec<PartitionLease>> {
        let now = self.now_ms_sql();
        let sql = self.sql(&format!(
            "SELECT part, owner, epoch, expires_ms - {now} FROM ingest_leases WHERE grp = $1 AND topic = $2 ORDER BY part"
        ));
        macro_rules! run {
            ($pool:expr) => {
                sqlx::query(&sql)
                    .bind(group)
                    .bind(topic)
                    .fetch_all($pool)
                    .await
                    .map(|rows| {
                        rows.iter()
                            .map(|r| PartitionLease {
                                partition: r.get::<i64, _>(0) as i32,
                                owner: r.get(1),
                                epoch: r.get(2),
                                expires_in_ms: r.get(3),
                            })
                            .collect()
                    })
            };
        }
        match self {
            Db::Postgres(p) => run!(p),
            Db::Sqlite(p) => run!(p),
        }
        .map_err(Error::db(format!("read the leases of {topic}")))
    }
}
