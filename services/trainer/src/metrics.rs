//! The trainer's Prometheus metrics (see `bd3lm_telemetry::metrics`); the step, loss and
//! validation gauges are the training library's own.

const JOBS: &str = "bd3lm_training_jobs_total";

/// Describes the trainer's metrics to the installed recorder.
pub fn describe() {
    metrics::describe_counter!(
        JOBS,
        "Job attempts that ended on this trainer, by outcome (succeeded, failed, cancelled; released: left for another trainer; lost: taken over)"
    );
    crate::housekeeping::describe();
    bd3lm_training::trainer::describe_metrics();
    bd3lm_jobs::describe_metrics();
}

/// Counts an attempt that ended in `outcome`.
pub(crate) fn ended(outcome: &'static str) {
    metrics::counter!(JOBS, "outcome" => outcome).increment(1);
}
