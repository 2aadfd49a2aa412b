//! tickmesh-ingest: the ingest role.
//!
//! - [`producer`]: what `tickmesh produce` publishes (synthetic market, daily CSV).
//! - [`bars_consumer`]: `BarsConsumerActor`, bus `h_alpaca` → Parquet in `stock-data`.
//! - [`supervisor`]: the ingest role's supervisor (consumers restarted by the configured policy).
//! - [`metrics`]: counters of what the consumers did.

pub mod bars_consumer;
pub mod metrics;
pub mod producer;
pub mod supervisor;
