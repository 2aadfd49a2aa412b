//! tickmesh-ingest: the ingest role.
//!
//! - [`producer`]: what `tickmesh produce` publishes (synthetic market, bar files, fundamentals files).
//! - [`alpaca`], [`fred`]: the market-data API producers, on [`http`]'s retrying GET.
//! - [`consumer`]: `ConsumerActor<S>`, one source's batched consumer (bus → merged Parquet objects, then commit).
//! - [`bars_consumer`]: the bars source, `h_alpaca`/`live_bars` → `stock-data` ticker-weeks.
//! - [`macro_consumer`]: the macro source, `h_macrodata` → `macro-data` series-years.
//! - [`company_consumer`]: the company source, `h_company` → `company-fundamentals` symbol-years.
//! - [`dlq`]: `tickmesh dlq list|replay`, the dead letters and their re-injection.
//! - [`supervisor`]: the ingest role's supervisor (consumers restarted by the configured policy).
//! - [`ownership`]: which ingest node reads which partition (leases in the database).
//! - [`metrics`]: counters of what the consumers did.

pub mod alpaca;
pub mod bars_consumer;
pub mod company_consumer;
pub mod consumer;
pub mod dlq;
pub mod fred;
pub mod http;
pub mod macro_consumer;
pub mod metrics;
pub mod ownership;
pub mod producer;
pub mod supervisor;
