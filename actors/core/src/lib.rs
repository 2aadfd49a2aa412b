//! tickmesh-core: the pure domain every role shares. No I/O dependencies:
//! no Kafka, S3, SQL, Parquet, async runtime or actor framework (those are
//! `tickmesh-io`), so the compute crates build and test without them.
//!
//! - [`config`]: `cluster.toml`, typed and validated, with environment overrides.
//! - [`types`]: the message contracts (`h_alpaca`, `start_model`, …) and domain types.
//! - [`calendar`], [`synthetic`]: the NYSE calendar and a deterministic synthetic market.
//! - [`Error`]: the one error type, shared by the adapters.

mod bars_json;
pub mod calendar;
pub mod config;
mod error;
pub mod synthetic;
pub mod types;

pub use error::{Error, Result};
