//! `PersistKv`: a session's window written to the store once, from this worker's memory,
//! when a generation that wrote no blobs as it went (`KV_PERSISTENCE_AT_END`) ends here.
//!
//! Best effort by design: a worker that no longer holds the session (evicted, restarted)
//! writes nothing, and the next worker rebuilds from the tokens. The blobs go in one
//! compare-and-set on the record as read, so a session that moved on or was deleted
//! meanwhile gets none. With the prefix cache on, the first prompt's whole blocks go to
//! the store's shared prompt blocks instead (content-addressed: the same bytes, which a
//! load takes from there), so sessions of one prompt store it once, each renewing its TTL.

use bd3lm_kvstore::{CommitOutcome, SessionRecord, SessionStore};
use bd3lm_proto::status::from_store;
use bd3lm_proto::v1::{PersistKvRequest, PersistKvResponse};
use tonic::Status;

use crate::LoadedModel;
use crate::block;
use crate::cache::SharedPrompt;
use crate::metrics;
use crate::models::Models;
use crate::sessions::SessionCaches;

/// Writes the window's blobs of the session of `req` when this worker holds it exactly as
/// the store does, at `req.committed_blocks`; its shared prompt blocks to the store's
/// shared blocks when `share_prompt` (the prefix cache is on).
pub async fn persist_kv(
    store: &SessionStore,
    models: &Models,
    sessions: &SessionCaches,
    req: PersistKvRequest,
    share_prompt: bool,
) -> Result<PersistKvResponse, Status> {
    if !bd3lm_kvstore::record::is_session_id(&req.session_id) {
        return Err(Status::invalid_argument(
            "session_id: must be 32 lowercase hex digits",
        ));
    }
    let none = PersistKvResponse::default();
    let Some(latest) = models.latest() else {
        return Ok(none);
    };
    let committed = req.committed_blocks as usize;
    let record = store
        .get_session(&latest.loaded.model_id, &req.session_id)
        .await
        .map_err(from_store)?;
    let Some(record) = record.filter(|r| r.committed_blocks == committed && committed > 0) else {
        return Ok(none);
    };
    let Some(served) = models.for_session(record.model_version) else {
        return Ok(none);
    };
    let loaded = served.loaded.clone();
    let key = crate::service::cache_key(&record.id, &loaded);
    let bs = loaded.model.config().block_size;
    let Some(state) = sessions.take(&key) else {
        metrics::persisted("not_held");
        return Ok(none);
    };
    let held = state.committed == committed * bs
        && record
            .tokens
            .starts_with(&state.tokens[..state.committed.min(state.tokens.len())]);
    if !held {
        sessions.put(key, state);
        metrics::persisted("not_held");
        return Ok(none);
    }
    // Exporting a window is megabytes of copies: off the async threads.
    let exported = tokio::task::spawn_blocking(move || {
        let first = state.cache.first_position() / bs;
        let blobs = block::window_blobs(&loaded, &state.tokens, &state.cache, first..committed);
        (state, blobs)
    })
    .await;
    // A panic in the export loses the held state (the next block rebuilds); an error
    // keeps it.
    let (state, blobs) = exported.map_err(|e| export_failed(&e))?;
    sessions.put(key, state);
    let blobs = blobs.map_err(|e| export_failed(&e))?;
    let (count, bytes) = (blobs.len(), blobs.iter().map(|(_, b)| b.len()).sum());
    let blobs = match share_prompt {
        true => put_shared(store, &served.loaded, &record, blobs).await?,
        false => blobs,
    };
    let outcome = store
        .commit(&record, record.base(), blobs, 0..0)
        .await
        .map_err(from_store)?;
    if matches!(outcome, CommitOutcome::Superseded(_)) {
        metrics::persisted("superseded");
        return Ok(none);
    }
    metrics::persisted("written");
    metrics::blob_written(bytes);
    Ok(PersistKvResponse {
        blocks_written: count as u32,
        bytes_written: bytes as u64,
    })
}

/// Puts the blobs of `record`'s shared prompt blocks among `blobs` to the store's shared
/// blocks and returns the others, the session's own.
async fn put_shared(
    store: &SessionStore,
    loaded: &LoadedModel,
    record: &SessionRecord,
    blobs: Vec<(usize, Vec<u8>)>,
) -> Result<Vec<(usize, Vec<u8>)>, Status> {
    let bs = loaded.model.config().block_size;
    let Some(prompt) = SharedPrompt::of(record, bs) else {
        return Ok(blobs);
    };
    let (shared, own): (Vec<_>, Vec<_>) = blobs
        .into_iter()
        .partition(|(b, _)| *b < prompt.addresses.len());
    if !shared.is_empty() {
        let scope = loaded.prefix_scope();
        store
            .put_prefix_blobs(scope, &prompt.addresses, shared)
            .await
            .map_err(from_store)?;
    }
    Ok(own)
}

/// An export that failed, logged; the caller is told only that it did.
fn export_failed(e: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %e, "exporting the session's window failed");
    Status::internal("persisting the KV state failed on this worker")
}
