//! tickmesh-aggregate: the aggregate role.
//!
//! - [`indicators`]: pure technical-indicator math (SMA, EMA, RSI, MACD, OBV, log return).
//! - [`resample`]: 1-minute bars → 5m / 15m / 1h / 1d bars on the New York clock.
//! - [`features`]: one `aggregated_data` row per resampled bar.
//! - [`aggregator`]: `AggregatorActor`, Parquet in the store → `aggregated_data` → `start_model`.

pub mod aggregator;
pub mod features;
pub mod indicators;
pub mod resample;
