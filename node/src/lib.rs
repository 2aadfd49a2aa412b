//! The `tickmesh` binary's library: role wiring, the demo and its chart, so
//! that integration tests start roles exactly as the binary does.
//!
//! - [`roles`]: starts a node's roles on connected adapters.
//! - [`admin_cli`]: `tickmesh admin …`, a subcommand per Admin method.
//! - [`demo`]: the whole pipeline in one process on the embedded defaults.
//! - [`chart`]: the forecast-vs-actual PNG.
//! - [`cluster`]: ractor_cluster membership (node servers, node agents).
//! - [`bench`]: the training-throughput benchmark beside PyTorch.
//! - [`bench_cp`]: the control plane's placement and failover benchmark.
//! - [`bench_ingest`]: the ingest role's Kafka → Parquet throughput.
//! - [`dlq_cli`]: `tickmesh dlq list|replay`.
//! - [`produce_cli`]: `tickmesh produce …`, a subcommand per source.
//! - [`train_cli`]: `tickmesh train`, `evaluate` and `doctor`.

pub mod admin_cli;
pub mod bench;
pub mod bench_agg;
pub mod bench_cp;
pub mod bench_fused;
pub mod bench_ingest;
pub mod chart;
pub mod cluster;
pub mod demo;
pub mod dlq_cli;
pub mod produce_cli;
pub mod roles;
pub mod train_cli;
