//! tickmesh-io: the adapters to the outside world and the actor runtime
//! around them, over the pure domain of `tickmesh-core`.
//!
//! - [`parquet_io`]: the fixed Parquet schemas of the three sources.
//! - [`store`]: the object store (local directory or S3).
//! - [`db`]: the feature store and registries (SQLite or PostgreSQL), and
//!   the ingest consumers' partition leases.
//! - [`bus`]: the message bus (file spool or Kafka).
//! - [`supervision`]: restart budgets for the role supervisors.
//! - [`telemetry`]: the metrics recorder and the `/metrics` text.
//! - [`Adapters`]: the adapters of one mode, connected.

pub mod bus;
pub mod db;
mod db_aggregate;
mod db_leases;
mod db_load;
pub mod parquet_io;
pub mod store;
pub mod supervision;
pub mod telemetry;

use std::sync::Arc;

use bus::{BusConfig, SharedPublisher};
use db::Db;
use store::{LocalStore, S3Store, SharedStore};
use tickmesh_core::config::{Backend, ClusterConfig};
use tickmesh_core::Result;

/// The adapters of one mode, connected: what the actors are handed.
#[derive(Clone)]
pub struct Adapters {
    pub store: SharedStore,
    pub db: Db,
    pub bus: BusConfig,
    pub publisher: SharedPublisher,
}

impl Adapters {
    /// Connects the adapters the config's backend names. Fails with the
    /// service and the script that starts it when one is unreachable.
    pub async fn connect(cfg: &ClusterConfig) -> Result<Self> {
        match cfg.cluster.backend {
            Backend::Embedded => {
                let e = &cfg.embedded;
                let store: SharedStore = Arc::new(LocalStore::open(e.store_dir())?);
                let db = Db::open_sqlite(&e.sqlite_path()).await?;
                let bus = BusConfig::Spool { root: e.raw_dir() };
                let publisher = bus.publisher()?;
                Ok(Adapters {
                    store,
                    db,
                    bus,
                    publisher,
                })
            }
            Backend::Distributed => {
                let s3 = S3Store::new(&cfg.s3);
                s3.check_buckets().await?;
                let db = Db::connect_postgres(&cfg.postgres).await?;
                let bus = BusConfig::Kafka {
                    brokers: cfg.kafka.brokers.clone(),
                    topic_prefix: cfg.kafka.topic_prefix.clone(),
                    group_id: cfg.kafka.group_id.clone(),
                };
                let publisher = bus.publisher()?;
                Ok(Adapters {
                    store: Arc::new(s3),
                    db,
                    bus,
                    publisher,
                })
            }
        }
    }
}
