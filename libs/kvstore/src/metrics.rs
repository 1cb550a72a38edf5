//! The store's Prometheus metrics (recorded through the `metrics` facade; see
//! `bd3lm_telemetry::metrics`). Only the Redis store records: the memory store's
//! operations take microseconds and cannot fail on the network.

use std::time::Instant;

const OPERATION_SECONDS: &str = "bd3lm_store_operation_duration_seconds";
const ERRORS: &str = "bd3lm_store_errors_total";
const RETRIES: &str = "bd3lm_store_retries_total";
const SWEPT: &str = "bd3lm_store_swept_total";
const SHORTFALLS: &str = "bd3lm_store_replication_shortfalls_total";

/// Describes the store's metrics to the installed recorder.
pub fn describe() {
    metrics::describe_histogram!(
        OPERATION_SECONDS,
        metrics::Unit::Seconds,
        "Time of one Redis operation (a script or a pipelined read), retries included, by op"
    );
    metrics::describe_counter!(
        ERRORS,
        "Redis operations that failed after their retries, by op"
    );
    metrics::describe_counter!(
        RETRIES,
        "Redis operations tried again on a broken connection, by op"
    );
    metrics::describe_counter!(
        SWEPT,
        "Expired tombstones and leases the janitor deleted (they carry no Redis TTL)"
    );
    metrics::describe_counter!(
        SHORTFALLS,
        "Session writes fewer replicas acknowledged than --redis-sync-replicas in time"
    );
}

/// Records operation `op`, begun at `started`, and whether it succeeded.
pub(crate) fn operation(op: &'static str, started: Instant, ok: bool) {
    metrics::histogram!(OPERATION_SECONDS, "op" => op).record(started.elapsed().as_secs_f64());
    if !ok {
        metrics::counter!(ERRORS, "op" => op).increment(1);
    }
}

/// Records one retry of operation `op`.
pub(crate) fn retried(op: &'static str) {
    metrics::counter!(RETRIES, "op" => op).increment(1);
}

/// Records `deleted` keys swept by the janitor.
pub(crate) fn swept(deleted: usize) {
    metrics::counter!(SWEPT).increment(deleted as u64);
}

/// Records a session write fewer replicas acknowledged than asked.
pub(crate) fn replication_shortfall() {
    metrics::counter!(SHORTFALLS).increment(1);
}
