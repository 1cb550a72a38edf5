//! The worker's Prometheus metrics (recorded through the `metrics` facade; see
//! `bd3lm_telemetry::metrics`).

use std::time::Duration;

use crate::cache::CacheSource;

const BLOCK_SECONDS: &str = "bd3lm_block_duration_seconds";
const PASSES_PER_TOKEN: &str = "bd3lm_forward_passes_per_token";
const BATCH_SIZE: &str = "bd3lm_batch_size";
const PASS_SECONDS: &str = "bd3lm_batch_pass_duration_seconds";
const IN_FLIGHT: &str = "bd3lm_worker_blocks_in_flight";
const CACHE_LOOKUPS: &str = "bd3lm_kv_cache_lookups_total";
const CACHE_BYTES: &str = "bd3lm_kv_cache_bytes";
const CACHE_EVICTIONS: &str = "bd3lm_kv_cache_evictions_total";
const BLOB_READ: &str = "bd3lm_kv_blob_read_bytes_total";
const BLOB_WRITTEN: &str = "bd3lm_kv_blob_written_bytes_total";
const BLOBS_REJECTED: &str = "bd3lm_kv_blobs_rejected_total";
const MODEL_VERSION: &str = "bd3lm_model_version";
const VERSIONS_LOADED: &str = "bd3lm_model_versions_loaded";
const SESSIONS_MOVED: &str = "bd3lm_sessions_moved_total";
const KV_PERSISTS: &str = "bd3lm_kv_persists_total";
const PREFIX_LOOKUPS: &str = "bd3lm_prefix_cache_lookups_total";
const PREFIX_TOKENS: &str = "bd3lm_prefix_tokens_reused_total";
const PREFIX_BYTES: &str = "bd3lm_prefix_cache_bytes";
const PREFIX_EVICTIONS: &str = "bd3lm_prefix_cache_evictions_total";
const SHARED_WRITE_FAILURES: &str = "bd3lm_prefix_store_write_failures_total";

/// Describes the worker's metrics to the installed recorder.
pub fn describe() {
    bd3lm_jobs::describe_metrics();
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        BLOCK_SECONDS,
        Unit::Seconds,
        "Time of one committed block on the worker (cache, denoising, commit), by the source of its KV cache"
    );
    describe_histogram!(
        PASSES_PER_TOKEN,
        "Forward passes per token of each committed block"
    );
    describe_histogram!(BATCH_SIZE, "Blocks (sessions) in each batched forward pass");
    describe_histogram!(
        PASS_SECONDS,
        Unit::Seconds,
        "Time of one batched forward pass"
    );
    describe_gauge!(
        IN_FLIGHT,
        "Blocks on this worker: opening, in the batch or waiting for it, committing"
    );
    describe_counter!(
        CACHE_LOOKUPS,
        "Where blocks found their session's KV cache: memory, store (hits) or miss (rebuilt from tokens)"
    );
    describe_gauge!(
        CACHE_BYTES,
        Unit::Bytes,
        "Bytes of the sessions' KV caches the worker keeps in memory"
    );
    describe_counter!(
        CACHE_EVICTIONS,
        "Sessions' KV caches evicted from memory to stay within --cache-bytes"
    );
    describe_counter!(BLOB_READ, Unit::Bytes, "KV blob bytes read from the store");
    describe_counter!(
        PREFIX_LOOKUPS,
        "New sessions' prompts looked up in the shared prompt blocks: found in memory (the prefix cache), in the store, or a miss"
    );
    describe_counter!(
        PREFIX_TOKENS,
        "Prompt tokens whose keys and values were imported from the shared prefix cache, not computed"
    );
    describe_gauge!(
        PREFIX_BYTES,
        Unit::Bytes,
        "Bytes of prompt blocks' KV blobs in the shared prefix cache"
    );
    describe_counter!(
        PREFIX_EVICTIONS,
        "Prompt blocks evicted from the shared prefix cache to stay within its budget"
    );
    describe_counter!(
        SHARED_WRITE_FAILURES,
        "Writes of computed prompt blocks to the store's shared blocks that failed (the blocks are computed again where needed)"
    );
    describe_counter!(
        BLOB_WRITTEN,
        Unit::Bytes,
        "KV blob bytes written to the store"
    );
    describe_counter!(
        BLOBS_REJECTED,
        "KV blobs refused: corrupt, or of another model state, block or token prefix"
    );
    describe_gauge!(
        MODEL_VERSION,
        "The registry version new sessions get (0 for a checkpoint directory)"
    );
    describe_gauge!(
        VERSIONS_LOADED,
        "Model versions loaded: the latest, and superseded ones still serving their sessions"
    );
    describe_counter!(
        KV_PERSISTS,
        "PersistKv calls (a generation's end under at-end KV persistence), by outcome: written, not_held (the session is not in this worker's memory as the store has it), superseded (it moved on or was deleted meanwhile)"
    );
    describe_counter!(
        SESSIONS_MOVED,
        "Blocks of sessions whose model version was no longer loaded, run on the latest (KV state rebuilt)"
    );
}

/// The latest version is `latest`, with `loaded` versions in memory.
pub fn model_versions(latest: Option<u64>, loaded: usize) {
    metrics::gauge!(MODEL_VERSION).set(latest.unwrap_or(0) as f64);
    metrics::gauge!(VERSIONS_LOADED).set(loaded as f64);
}

/// A session moved to the latest version.
pub fn session_moved() {
    metrics::counter!(SESSIONS_MOVED).increment(1);
}

/// A block committed after `took`, its cache from `source`, in `passes` forward passes
/// for `tokens` tokens.
pub fn block_committed(source: CacheSource, took: Duration, passes: usize, tokens: usize) {
    metrics::histogram!(BLOCK_SECONDS, "cache" => source.name()).record(took.as_secs_f64());
    if tokens > 0 {
        metrics::histogram!(PASSES_PER_TOKEN).record(passes as f64 / tokens as f64);
    }
}

/// One batched pass over `blocks` blocks, which took `took`.
pub fn batch_pass(blocks: usize, took: Duration) {
    metrics::histogram!(BATCH_SIZE).record(blocks as f64);
    metrics::histogram!(PASS_SECONDS).record(took.as_secs_f64());
}

/// One more (`+1`) or one fewer (`-1`) block on the worker (a change, so that workers
/// sharing a process add up).
pub fn in_flight(change: f64) {
    metrics::gauge!(IN_FLIGHT).increment(change);
}

/// Where a block's KV cache was found: `"memory"`, `"store"` or `"miss"`.
pub fn cache_lookup(result: &'static str) {
    metrics::counter!(CACHE_LOOKUPS, "result" => result).increment(1);
}

/// A new session's prompt looked up in the shared prompt blocks: found in `result`
/// ("memory": the prefix cache, "store") with `tokens` reused, or "miss".
pub fn prefix_lookup(result: &'static str, tokens: usize) {
    metrics::counter!(PREFIX_LOOKUPS, "result" => result).increment(1);
    metrics::counter!(PREFIX_TOKENS).increment(tokens as u64);
}

/// A write of shared prompt blocks to the store failed.
pub fn shared_write_failed() {
    metrics::counter!(SHARED_WRITE_FAILURES).increment(1);
}

/// The bytes the prefix cache holds now.
pub fn prefix_bytes(bytes: usize) {
    metrics::gauge!(PREFIX_BYTES).set(bytes as f64);
}

/// A prompt block evicted from the prefix cache.
pub fn prefix_evicted() {
    metrics::counter!(PREFIX_EVICTIONS).increment(1);
}

/// A change of the bytes of KV caches held in memory (a change, so that workers sharing
/// a process add up).
pub fn cache_bytes(change: f64) {
    metrics::gauge!(CACHE_BYTES).increment(change);
}

/// A session's KV cache evicted from memory to stay within the budget.
pub fn cache_eviction() {
    metrics::counter!(CACHE_EVICTIONS).increment(1);
}

/// KV blob bytes read from the store.
pub fn blob_read(bytes: usize) {
    metrics::counter!(BLOB_READ).increment(bytes as u64);
}

/// KV blob bytes written to the store.
pub fn blob_written(bytes: usize) {
    metrics::counter!(BLOB_WRITTEN).increment(bytes as u64);
}

/// A `PersistKv` call ended with `outcome` (`"written"`, `"not_held"`, `"superseded"`).
pub fn persisted(outcome: &'static str) {
    metrics::counter!(KV_PERSISTS, "outcome" => outcome).increment(1);
}

/// A KV blob refused, for `reason` (`"corrupt"` or `"mismatch"`).
pub fn blob_rejected(reason: &'static str) {
    metrics::counter!(BLOBS_REJECTED, "reason" => reason).increment(1);
}
