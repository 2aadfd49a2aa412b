//! tickmesh-aggregate: the aggregate role.
//!
//! - [`resample`]: 1-minute bars → 1m / 5m / 15m / 30m / 1h / 1d bars of the NYSE regular
//!   session, labelled by bucket start (extended hours left out).
//!   Feature rows come from `tickmesh-features` (the incremental indicators).
//! - [`auto`]: the role on its own: ingest watermarks, a schedule, the Admin API's requests.
//! - [`live`]: live mode, `live_bars` → incremental indicators → appended rows.
//! - [`joins`]: as-of joins of macro series and fundamentals, without look-ahead.
//! - [`aggregator`]: `AggregatorActor`, Parquet in the store → `aggregated_data` → `start_model`.

pub mod aggregator;
pub mod auto;
pub mod joins;
pub mod live;
pub mod resample;
