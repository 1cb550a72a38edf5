//! The coordinator's Prometheus metrics (recorded through the `metrics` facade; see
//! `bd3lm_telemetry::metrics`).

use std::time::{Duration, Instant};

use tonic::Code;

const REQUESTS: &str = "bd3lm_requests_total";
const REQUEST_SECONDS: &str = "bd3lm_request_duration_seconds";
const GENERATIONS: &str = "bd3lm_generations_total";
const GENERATION_SECONDS: &str = "bd3lm_generation_duration_seconds";
const FIRST_BLOCK_SECONDS: &str = "bd3lm_time_to_first_block_seconds";
const TOKENS: &str = "bd3lm_generated_tokens_total";
const QUEUE: &str = "bd3lm_queue_blocks";
const QUEUE_SECONDS: &str = "bd3lm_queue_wait_seconds";
const SLOTS: &str = "bd3lm_admission_slots";
const RETRIES: &str = "bd3lm_retries_total";
const STALLS: &str = "bd3lm_worker_stalls_total";
const PREFIX_ROUTES: &str = "bd3lm_prefix_routes_total";
const HEARTBEATS: &str = "bd3lm_worker_heartbeats_total";
const RESTORES: &str = "bd3lm_session_restores_total";
const KV_PERSISTED: &str = "bd3lm_kv_window_persists_total";
const INVALID: &str = "bd3lm_invalid_requests_total";
const WORKERS: &str = "bd3lm_workers_healthy";
const HTTP_REQUESTS: &str = "bd3lm_http_requests_total";
const HTTP_SECONDS: &str = "bd3lm_http_request_duration_seconds";

/// Describes the coordinator's metrics to the installed recorder.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    bd3lm_jobs::describe_metrics();
    describe_counter!(
        REQUESTS,
        "Calls answered, by method and status code (a GenerateStream call counts when its stream opens)"
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "Time to answer a call, by method (GenerateStream: until its stream opens)"
    );
    describe_counter!(
        HTTP_REQUESTS,
        "Calls of the HTTP API answered, by route and HTTP status (a generation also counts in bd3lm_requests_total as GenerateStream)"
    );
    describe_histogram!(
        HTTP_SECONDS,
        Unit::Seconds,
        "Time to answer a call of the HTTP API, by route (a stream: until it opens)"
    );
    describe_counter!(
        GENERATIONS,
        "Generations ended, by outcome: a stop reason, or the status code that failed them"
    );
    describe_histogram!(
        GENERATION_SECONDS,
        Unit::Seconds,
        "Time of a whole generation"
    );
    describe_histogram!(
        FIRST_BLOCK_SECONDS,
        Unit::Seconds,
        "Time from a generation's start to its first block"
    );
    describe_counter!(TOKENS, "Tokens returned to clients");
    describe_gauge!(QUEUE, "Blocks waiting for a worker's capacity");
    describe_histogram!(
        QUEUE_SECONDS,
        Unit::Seconds,
        "Time a block waited for a worker's capacity"
    );
    describe_gauge!(
        SLOTS,
        "Blocks the healthy workers take at once (their capacity)"
    );
    describe_counter!(
        RETRIES,
        "Blocks asked again after a worker's failure, by its status code"
    );
    describe_counter!(
        RESTORES,
        "Sessions put back into a store that lost them (lost: the record was gone; behind: it had lost committed blocks, as after a failover)"
    );
    describe_counter!(
        KV_PERSISTED,
        "Generations under at-end KV persistence that asked their last worker to write the window, by outcome: written, not_held (the worker no longer held the session), no_worker (none remembered or healthy), failed"
    );
    describe_counter!(
        INVALID,
        "Requests refused as invalid, by the field at fault"
    );
    describe_gauge!(WORKERS, "Denoise workers passing their health checks");
    describe_counter!(
        PREFIX_ROUTES,
        "New sessions whose prompt prefix a worker began a session with: routed there (held), or not for want of room (busy) or health (gone)"
    );
    describe_counter!(
        STALLS,
        "Runs moved off a worker that sent no progress within the stall wait"
    );
    describe_counter!(
        HEARTBEATS,
        "Progress messages from workers while they denoised a run's block"
    );
}

/// A call of `method`, begun at `started`, answered with `code`.
pub fn request(method: &'static str, started: Instant, code: Code) {
    metrics::counter!(REQUESTS, "method" => method, "code" => code_name(code)).increment(1);
    metrics::histogram!(REQUEST_SECONDS, "method" => method)
        .record(started.elapsed().as_secs_f64());
}

/// A call of the HTTP API's `route`, begun at `started`, answered with `status`.
pub fn http_request(route: &'static str, started: Instant, status: u16) {
    let status = status.to_string();
    metrics::counter!(HTTP_REQUESTS, "route" => route, "status" => status).increment(1);
    metrics::histogram!(HTTP_SECONDS, "route" => route).record(started.elapsed().as_secs_f64());
}

/// A generation, begun at `started`, ended with `outcome`.
pub fn generation(outcome: &'static str, started: Instant) {
    metrics::counter!(GENERATIONS, "outcome" => outcome).increment(1);
    metrics::histogram!(GENERATION_SECONDS).record(started.elapsed().as_secs_f64());
}

/// A generation's first block arrived `after` its start.
pub fn first_block(after: Duration) {
    metrics::histogram!(FIRST_BLOCK_SECONDS).record(after.as_secs_f64());
}

/// `tokens` tokens returned to a client.
pub fn tokens(tokens: usize) {
    metrics::counter!(TOKENS).increment(tokens as u64);
}

/// One more (`+1`) or one fewer (`-1`) block waiting for capacity.
pub fn queue(change: f64) {
    metrics::gauge!(QUEUE).increment(change);
}

/// A block waited `waited` for its slot.
pub fn queue_wait(waited: Duration) {
    metrics::histogram!(QUEUE_SECONDS).record(waited.as_secs_f64());
}

/// The workers' capacity now.
pub fn slots(total: usize) {
    metrics::gauge!(SLOTS).set(total as f64);
}

/// A new session's route by its prompt prefix: `held`, `busy` or `gone`.
pub fn prefix_route(result: &'static str) {
    metrics::counter!(PREFIX_ROUTES, "result" => result).increment(1);
}

/// Counts a run taken for stalled.
pub fn stall() {
    metrics::counter!(STALLS).increment(1);
}

/// Counts a worker's progress message.
pub fn heartbeat() {
    metrics::counter!(HEARTBEATS).increment(1);
}

/// A block asked again after a failure with `code`.
pub fn retry(code: Code) {
    metrics::counter!(RETRIES, "code" => code_name(code)).increment(1);
}

/// A session put back into the store, which had `lost` it or was `behind`.
pub fn restore(reason: &'static str) {
    metrics::counter!(RESTORES, "reason" => reason).increment(1);
}

/// A generation's end asked for its KV window to be written, with `outcome`.
pub fn kv_persisted(outcome: &'static str) {
    metrics::counter!(KV_PERSISTED, "outcome" => outcome).increment(1);
}

/// A request refused as invalid with `message`, which starts with the field at fault.
pub fn invalid(message: &str) {
    let field = message.split(':').next().unwrap_or_default();
    // Messages come from a fixed set of templates; the check keeps the label bounded
    // should one ever start with something else.
    let field = if field.len() <= 40
        && field
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
    {
        field.to_string()
    } else {
        "other".to_string()
    };
    metrics::counter!(INVALID, "field" => field).increment(1);
}

/// Workers healthy now.
pub fn workers_healthy(count: usize) {
    metrics::gauge!(WORKERS).set(count as f64);
}

/// The status code's name as gRPC spells it (`OK`, `RESOURCE_EXHAUSTED`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_requests_are_counted_by_their_field_only() {
        let recorder = bd3lm_telemetry::metrics::recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            invalid("max_new_tokens: 9999 exceeds the limit of 4096");
            invalid("prompt: the secret text of a user: is not valid");
            invalid("Something Else entirely");
        });
        let text = handle.render();
        assert!(
            text.contains("bd3lm_invalid_requests_total{field=\"max_new_tokens\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bd3lm_invalid_requests_total{field=\"prompt\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bd3lm_invalid_requests_total{field=\"other\"} 1"),
            "{text}"
        );
        assert!(!text.contains("secret"), "{text}");
    }
}
