//! Where a session's KV cache comes from: the worker's memory, else the store's per-block
//! KV blobs, else a rebuild from the session's tokens. A blob that fails its checksum,
//! belongs to another model state (weights, dtype, configuration) or to other tokens is
//! a miss (logged and counted), never data.

use std::sync::atomic::{AtomicU64, Ordering};

use bd3lm_diffusion::Session;
use bd3lm_kvstore::blob::prefix_hashes;
use bd3lm_kvstore::{BlockBlob, SessionRecord, Store};
use bd3lm_model::KvCache;

use crate::Loaded;
use crate::metrics;
use crate::sessions::Held;

/// Where the KV cache of a block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSource {
    /// The worker's memory.
    Memory,
    /// The store's KV blobs.
    Store,
    /// Recomputed from the session's tokens.
    Rebuilt,
    /// Nothing committed yet.
    Empty,
}

impl CacheSource {
    /// The name reported in `BlockTiming.cache_source`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Store => "store",
            Self::Rebuilt => "rebuilt",
            Self::Empty => "empty",
        }
    }
}

/// A cache found before the block's work: from memory or from the store.
pub enum Found {
    /// The worker's own state after the session's last block.
    Memory(Held),
    /// Decoded from the store's blobs.
    Store(KvCache),
    /// Nothing usable: the session is rebuilt from its tokens (or starts empty).
    Nothing,
}

/// The session of `record` around the cache `found`, ready for its next block.
pub fn open<'m>(
    loaded: &'m Loaded,
    record: &SessionRecord,
    found: Found,
) -> bd3lm_diffusion::Result<(Session<'m>, CacheSource)> {
    let model = &loaded.model;
    let committed = record.committed_blocks * model.config().block_size;
    let (tokens, prompt_len) = (&record.tokens, record.prompt_len);
    Ok(match found {
        Found::Memory(held) => (
            Session::with_cache(model, held.cache, tokens, prompt_len, committed)?,
            CacheSource::Memory,
        ),
        Found::Store(cache) => (
            Session::with_cache(model, cache, tokens, prompt_len, committed)?,
            CacheSource::Store,
        ),
        Found::Nothing if committed == 0 => (
            Session::resume(model, tokens, prompt_len, 0)?,
            CacheSource::Empty,
        ),
        Found::Nothing => (
            Session::resume(model, tokens, prompt_len, committed)?,
            CacheSource::Rebuilt,
        ),
    })
}

/// Reads and checks the blobs of the live blocks before `block`; `None` on any miss,
/// mismatch or corruption (logged; the cache is then rebuilt from tokens). Refused blobs
/// are counted in `rejected`.
pub async fn from_store(
    store: &Store,
    loaded: &Loaded,
    record: &SessionRecord,
    block: usize,
    rejected: &AtomicU64,
) -> Option<KvCache> {
    let cfg = loaded.model.config();
    let bs = cfg.block_size;
    let live = (block * bs).min(cfg.model_length - bs) / bs;
    let wanted: Vec<usize> = (block - live..block).collect();
    let Some(hashes) = prefix_hashes(&record.tokens, bs, block - live..block) else {
        tracing::warn!("the record holds fewer tokens than its committed blocks; rebuilding");
        return None;
    };
    let blobs = match store.get_blobs(&loaded.model_id, &record.id, &wanted).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "reading KV blobs failed; rebuilding from tokens");
            return None;
        }
    };
    let mut payloads = Vec::with_capacity(blobs.len());
    for ((&index, bytes), prefix_hash) in wanted.iter().zip(blobs).zip(hashes) {
        let Some(bytes) = bytes else {
            tracing::info!(block = index, "KV blob missing; rebuilding from tokens");
            return None;
        };
        metrics::blob_read(bytes.len());
        match BlockBlob::decode(bytes) {
            Ok(blob) if blob_fits(&blob, loaded, index, prefix_hash) => payloads.push(blob.payload),
            Ok(blob) => {
                rejected.fetch_add(1, Ordering::Relaxed);
                metrics::blob_rejected("mismatch");
                tracing::warn!(block = index, model = %blob.model_id, fingerprint = %blob.fingerprint, "KV blob of another model state, block or tokens; rebuilding");
                return None;
            }
            Err(e) => {
                rejected.fetch_add(1, Ordering::Relaxed);
                metrics::blob_rejected("corrupt");
                tracing::warn!(block = index, error = %e, "corrupt KV blob; rebuilding");
                return None;
            }
        }
    }
    import(loaded, &payloads, block * bs)
}

fn blob_fits(blob: &BlockBlob, loaded: &Loaded, index: usize, prefix_hash: u64) -> bool {
    blob.model_id == loaded.model_id
        && blob.fingerprint == loaded.fingerprint
        && blob.block_index == index as u64
        && blob.prefix_hash == prefix_hash
}

/// The cache of the decoded `payloads`, which must end at position `end`.
fn import(loaded: &Loaded, payloads: &[Vec<u8>], end: usize) -> Option<KvCache> {
    let parts: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let cache = if parts.is_empty() {
        loaded.model.new_cache(1)
    } else {
        KvCache::import(&parts, loaded.model.device())
    };
    match cache {
        Ok(c) if c.next_position() == end => Some(c),
        Ok(c) => {
            tracing::warn!(
                end = c.next_position(),
                "KV blobs end at the wrong position; rebuilding"
            );
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "KV blob payload rejected; rebuilding");
            None
        }
    }
}
