//! tickmesh-ingest: the ingest role.
//!
//! - [`producer`]: what `tickmesh produce` publishes (synthetic market, daily CSV).
//! - [`consumer`]: `ConsumerActor<S>`, one source's batched consumer (bus → merged Parquet objects, then commit).
//! - [`bars_consumer`]: the bars source, `h_alpaca`/`live_bars` → `stock-data` ticker-weeks.
//! - [`supervisor`]: the ingest role's supervisor (consumers restarted by the configured policy).
//! - [`metrics`]: counters of what the consumers did.

pub mod bars_consumer;
pub mod consumer;
pub mod metrics;
pub mod producer;
pub mod supervisor;
