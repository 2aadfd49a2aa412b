//! The process's metrics, through the `metrics` facade and its Prometheus
//! exporter: every role records with `metrics::counter!` / `gauge!` /
//! `histogram!`, and each node serves [`render`] at `/metrics` (HELP and
//! TYPE lines included; latencies are histograms with the buckets below).
//!
//! The names and their help texts are listed once, in [`describe`].

use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Bucket bounds (seconds) of every `_seconds` histogram.
pub const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// Installs the Prometheus recorder as the process's global one (once;
/// later calls do nothing). Metrics recorded before it are not kept.
pub fn install() {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        match metrics::set_global_recorder(recorder) {
            Ok(()) => {
                describe();
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "another metrics recorder is installed: /metrics serves nothing");
                None
            }
        }
    });
}

/// The Prometheus text exposition of every metric recorded so far.
pub fn render() -> String {
    install();
    match HANDLE.get() {
        Some(Some(h)) => h.render(),
        _ => String::new(),
    }
}

/// The help texts of tickmesh's metrics.
fn describe() {
    describe_counter!(
        "tickmesh_ingest_records_total",
        "Records taken from the bus by the ingest consumers, good and bad."
    );
    describe_counter!(
        "tickmesh_ingest_bytes_total",
        Unit::Bytes,
        "Payload bytes taken from the bus by the ingest consumers."
    );
    describe_counter!(
        "tickmesh_ingest_rows_total",
        "Rows (bars, macro observations, fundamentals) merged into objects."
    );
    describe_counter!(
        "tickmesh_ingest_objects_written_total",
        "Parquet objects written (one per object a batch touches)."
    );
    describe_counter!(
        "tickmesh_ingest_write_conflicts_total",
        "Conditional object writes that lost to another writer and merged again."
    );
    describe_counter!(
        "tickmesh_ingest_dead_letters_total",
        "Invalid records sent to <topic>.dlq."
    );
    describe_histogram!(
        "tickmesh_ingest_write_seconds",
        Unit::Seconds,
        "Time to merge one object into the store (read, merge, conditional write)."
    );
    describe_gauge!(
        "tickmesh_ingest_consumer_lag",
        "Records on a partition not yet handed to its consumer (high watermark minus next offset; spool: files waiting)."
    );
    describe_gauge!(
        "tickmesh_ingest_partitions_owned",
        "Partitions of a topic this node holds the lease of."
    );
    describe_counter!(
        "tickmesh_kafka_gaps_total",
        "Offsets the broker skipped; each started a hunt for the missing records."
    );
    describe_counter!(
        "tickmesh_kafka_gaps_recovered_total",
        "Hunts that found the skipped records again."
    );
    describe_counter!(
        "tickmesh_kafka_gaps_genuine_total",
        "Gaps that were real (compaction, transaction markers)."
    );
    describe_counter!(
        "tickmesh_kafka_seeks_total",
        "Seeks made while hunting for skipped records."
    );
    describe_counter!("tickmesh_kafka_commits_total", "Offset commits sent.");
    describe_counter!(
        "tickmesh_kafka_commit_failures_total",
        "Asynchronous offset commits the broker refused (a later commit covers them)."
    );
    describe_counter!(
        "tickmesh_supervisor_restarts_total",
        "Children restarted by a supervisor."
    );
    describe_counter!(
        "tickmesh_supervisor_escalations_total",
        "Supervisors that gave up (restart budget spent)."
    );
    describe_counter!(
        "tickmesh_forecast_requests_total",
        "Forecast requests by outcome (ok, client_error, too_many, overloaded, unavailable, internal)."
    );
    describe_histogram!(
        "tickmesh_forecast_request_seconds",
        Unit::Seconds,
        "Forecast request latency, by outcome."
    );
    describe_histogram!(
        "tickmesh_forecast_compute_seconds",
        Unit::Seconds,
        "Time of one chunk of forecast steps on a compute slot."
    );
    describe_counter!(
        "tickmesh_forecast_steps_total",
        "Forecast steps computed (one forward pass each), per model."
    );
    describe_counter!(
        "tickmesh_forecast_shared_total",
        "Requests answered by another request's computation (running) or its finished result (finished)."
    );
    describe_counter!(
        "tickmesh_forecast_cancelled_total",
        "Forecast computations stopped because every request waiting for them went away."
    );
    describe_counter!(
        "tickmesh_forecast_panics_total",
        "Forecast computations that panicked (the request got 500; the model keeps serving)."
    );
    describe_gauge!(
        "tickmesh_forecast_inflight",
        "Forecast requests being answered on this node."
    );
    describe_counter!(
        "tickmesh_model_loads_total",
        "Model version loads by outcome (served, retry, refused)."
    );
    describe_counter!(
        "tickmesh_model_refusals_total",
        "Model versions refused (bad digest, malformed files, non-finite output), per model."
    );
    describe_gauge!(
        "tickmesh_predictor_version",
        "The model version each predictor serves."
    );
}
