//! tickmesh-aggregate: the aggregate role.
//!
//! - [`resample`]: 1-minute bars → 5m / 15m / 1h / 1d bars on the New York clock.
//!   Feature rows come from `tickmesh-features` (the incremental indicators).
//! - [`aggregator`]: `AggregatorActor`, Parquet in the store → `aggregated_data` → `start_model`.

pub mod aggregator;
pub mod resample;
