//! Where a session's KV cache comes from: the worker's memory, else the store's per-block
//! KV blobs, else a rebuild from the session's tokens; a new session's from the shared
//! prompt blocks, in the worker's prefix cache ([`crate::prefix`]) or else the store's,
//! as far as another prompt began with the same blocks. A blob that fails its checksum,
//! belongs to another model state (weights, precisions, configuration) or to other tokens
//! is a miss (logged and counted), never data.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bd3lm_diffusion::Session;
use bd3lm_kvstore::blob::{prefix_hashes, shared_prefix_addresses};
use bd3lm_kvstore::{BlockBlob, SessionRecord, SessionStore};
use bd3lm_model::{KvCache, SharedKv};
use rayon::prelude::*;

use crate::LoadedModel;
use crate::metrics;
use crate::prefix::PrefixCache;
use crate::sessions::SessionState;

/// Where the KV cache of a block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSource {
    /// The worker's memory.
    Memory,
    /// The store's KV blobs.
    Store,
    /// Recomputed from the session's tokens.
    Rebuilt,
    /// A new session's first prompt blocks, from the shared prefix cache.
    Prefix,
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
            Self::Prefix => "prefix",
            Self::Empty => "empty",
        }
    }
}

/// A cache found before the block's work: from memory or from the store.
pub enum CacheLookup {
    /// The worker's own state after the session's last block.
    Memory(SessionState),
    /// The store's blobs of the live blocks, read but not yet checked or decoded: that is
    /// compute over megabytes, done where the session is opened.
    Store(StoredBlobs),
    /// A new session's first prompt blocks' blobs from the store's shared blocks (the
    /// live ones before the run's end), checked and decoded like the session's.
    Prefix(StoredBlobs),
    /// A new session's first prompt blocks held in the worker's prefix cache: the shared
    /// keys and values, and the block the run ends before.
    Shared(Arc<SharedKv>, usize),
    /// Nothing usable: the session is rebuilt from its tokens (or starts empty).
    Nothing,
}

/// The KV blobs of a session's live blocks as read from the store.
pub struct StoredBlobs {
    /// The blocks, oldest first.
    blocks: std::ops::Range<usize>,
    /// The hash of the session's tokens up to the end of each block.
    prefix_hashes: Vec<u64>,
    /// Each block's blob.
    bytes: Vec<Vec<u8>>,
    /// Where refused blobs are counted.
    rejected: Arc<AtomicU64>,
}

/// The session of `record` around the cache `lookup`, ready for its next block.
pub fn open<'m>(
    loaded: &'m LoadedModel,
    record: &SessionRecord,
    lookup: CacheLookup,
) -> bd3lm_diffusion::Result<(Session<'m>, CacheSource)> {
    let model = &loaded.model;
    let bs = model.config().block_size;
    let mut committed = record.committed_blocks * bs;
    let (tokens, prompt_len) = (&record.tokens, record.prompt_len);
    let (cache, source) = match lookup {
        CacheLookup::Memory(state) => (Some(state.cache), CacheSource::Memory),
        CacheLookup::Store(blobs) => {
            let cache = decode(loaded, blobs);
            metrics::cache_lookup(if cache.is_some() { "store" } else { "miss" });
            (cache, CacheSource::Store)
        }
        CacheLookup::Prefix(blobs) => {
            let end = blobs.blocks.end * bs;
            let cache = decode(loaded, blobs);
            prefix_found(cache, "store", end, &mut committed)
        }
        CacheLookup::Shared(kv, end) => {
            let cache = KvCache::on_shared(kv, end * bs).inspect_err(|e| {
                tracing::error!(error = %e, "shared prompt blocks do not fit; computing them");
            });
            prefix_found(cache.ok(), "memory", end * bs, &mut committed)
        }
        CacheLookup::Nothing => (None, CacheSource::Empty),
    };
    Ok(match cache {
        Some(cache) => (
            Session::with_cache(model, cache, tokens, prompt_len, committed)?,
            source,
        ),
        None if committed == 0 => (
            Session::resume(model, tokens, prompt_len, 0)?,
            CacheSource::Empty,
        ),
        None => (
            Session::resume(model, tokens, prompt_len, committed)?,
            CacheSource::Rebuilt,
        ),
    })
}

/// A new session's first prompt as far as it is shared: its whole blocks' prefix hashes
/// (checked against the blobs) and shared addresses (by which they are found).
pub struct SharedPrompt {
    /// Block `i`'s hash of the tokens up to its end.
    pub hashes: Vec<u64>,
    /// Block `i`'s shared address.
    pub addresses: Vec<u64>,
}

impl SharedPrompt {
    /// The shared whole blocks of `record`'s first prompt; `None` when it has none.
    pub fn of(record: &SessionRecord, block_size: usize) -> Option<Self> {
        let whole = record.prompt_len.min(record.tokens.len()) / block_size;
        if whole == 0 {
            return None;
        }
        let owner = record.owner.as_deref();
        Some(Self {
            hashes: prefix_hashes(&record.tokens, block_size, 0..whole)?,
            addresses: shared_prefix_addresses(&record.tokens, block_size, whole, owner)?,
        })
    }
}

/// What a prompt's shared blocks found, as the session's cache: counted as a reuse from
/// `from` of the prompt's tokens up to `end`, which it has committed, or as a miss.
fn prefix_found(
    cache: Option<KvCache>,
    from: &'static str,
    end: usize,
    committed: &mut usize,
) -> (Option<KvCache>, CacheSource) {
    match cache {
        Some(_) => {
            metrics::prefix_lookup(from, end);
            *committed = end;
        }
        None => metrics::prefix_lookup("miss", 0),
    }
    (cache, CacheSource::Prefix)
}

/// A new session's shared prompt blocks as found: where its cache comes from, and which
/// of its prompt's whole blocks the store's shared blocks hold (empty when unknown).
pub struct PromptLookup {
    /// The cache found.
    pub lookup: CacheLookup,
    /// Block `i` is in the store's shared blocks.
    pub stored: Vec<bool>,
}

/// The longest run of `record`'s whole first-prompt blocks held by the worker's prefix
/// cache, or, when the store's shared blocks hold a longer one, their blobs (the live
/// ones before the run's end); nothing when neither holds any. Blobs refused when
/// decoded are counted in `rejected`.
pub async fn find_prefix(
    prefix: &PrefixCache,
    store: &SessionStore,
    loaded: &LoadedModel,
    record: &SessionRecord,
    rejected: &Arc<AtomicU64>,
) -> PromptLookup {
    let cfg = loaded.model.config();
    let Some(prompt) = SharedPrompt::of(record, cfg.block_size) else {
        return PromptLookup {
            lookup: CacheLookup::Nothing,
            stored: Vec::new(),
        };
    };
    let scope = loaded.prefix_scope();
    let stored = match store.held_prefix_blocks(scope, &prompt.addresses).await {
        Ok(stored) => stored,
        Err(e) => {
            tracing::warn!(error = %e, "probing the store's shared prompt blocks failed");
            Vec::new()
        }
    };
    let held = prefix.longest(&loaded.fingerprint, &prompt.addresses);
    let in_memory = held.as_ref().map_or(0, |(end, _)| *end);
    let window = cfg.kv_window() / cfg.block_size;
    let end = longest_run(stored.len(), window, |b| stored[b]).filter(|&end| end > in_memory);
    let read = match end {
        Some(end) => read_shared(store, loaded, &prompt, end, rejected).await,
        None => None,
    };
    let lookup = match (read, held) {
        (Some(blobs), _) => CacheLookup::Prefix(blobs),
        (None, Some((end, kv))) => CacheLookup::Shared(kv, end),
        (None, None) => {
            metrics::prefix_lookup("miss", 0);
            CacheLookup::Nothing
        }
    };
    PromptLookup { lookup, stored }
}

/// The store's blobs of `prompt`'s shared blocks in the window before block `end`; those
/// refused when decoded are counted in `rejected`. A failed read, or a blob gone since
/// the probe, is logged and reads as none.
async fn read_shared(
    store: &SessionStore,
    loaded: &LoadedModel,
    prompt: &SharedPrompt,
    end: usize,
    rejected: &Arc<AtomicU64>,
) -> Option<StoredBlobs> {
    let scope = loaded.prefix_scope();
    let window = loaded.model.config().kv_window() / loaded.model.config().block_size;
    let blocks = end.saturating_sub(window)..end;
    let read = store.get_prefix_blobs(scope, &prompt.addresses, blocks.clone());
    let bytes = match read
        .await
        .map(|b| b.into_iter().collect::<Option<Vec<_>>>())
    {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            tracing::info!("a shared prompt block left the store since the probe; computing");
            return None;
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading shared prompt blocks failed; computing them");
            return None;
        }
    };
    bytes.iter().for_each(|b| metrics::blob_read(b.len()));
    Some(StoredBlobs {
        prefix_hashes: prompt.hashes[blocks.clone()].to_vec(),
        blocks,
        bytes,
        rejected: rejected.clone(),
    })
}

/// The end of the longest run of a prompt's `blocks` whose last `window` blocks are all
/// `held` (what a next block attends to); `None` when there is none.
fn longest_run(blocks: usize, window: usize, held: impl Fn(usize) -> bool) -> Option<usize> {
    (1..=blocks)
        .rev()
        .find(|&end| (end.saturating_sub(window)..end).all(&held))
}

/// Reads the blobs of the live blocks before `block`; `None` when one is missing or the
/// read fails (logged; the cache is then rebuilt from tokens). Blobs refused later, when
/// decoded, are counted in `rejected`.
pub async fn read_store(
    store: &SessionStore,
    loaded: &LoadedModel,
    record: &SessionRecord,
    block: usize,
    rejected: &Arc<AtomicU64>,
) -> Option<StoredBlobs> {
    let cfg = loaded.model.config();
    let bs = cfg.block_size;
    let live = (block * bs).min(cfg.kv_window()) / bs;
    let blocks = block - live..block;
    let Some(prefix_hashes) = prefix_hashes(&record.tokens, bs, blocks.clone()) else {
        tracing::warn!("the record holds fewer tokens than its committed blocks; rebuilding");
        return None;
    };
    let wanted: Vec<usize> = blocks.clone().collect();
    let read = match store.get_blobs(&loaded.model_id, &record.id, &wanted).await {
        Ok(b) => with_shared(store, loaded, record, blocks.clone(), b).await,
        Err(e) => Err(e),
    };
    let read = match read {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "reading KV blobs failed; rebuilding from tokens");
            return None;
        }
    };
    let mut bytes = Vec::with_capacity(read.len());
    for (index, blob) in blocks.clone().zip(read) {
        let Some(blob) = blob else {
            tracing::info!(block = index, "KV blob missing; rebuilding from tokens");
            return None;
        };
        metrics::blob_read(blob.len());
        bytes.push(blob);
    }
    Some(StoredBlobs {
        blocks,
        prefix_hashes,
        bytes,
        rejected: rejected.clone(),
    })
}

/// The session's blobs `read` of `blocks`, those it lacks taken from the store's shared
/// prompt blocks: a new session whose prompt's blocks went there wrote no copies of its
/// own (the same bytes: the blob of a block depends on its tokens only).
async fn with_shared(
    store: &SessionStore,
    loaded: &LoadedModel,
    record: &SessionRecord,
    blocks: std::ops::Range<usize>,
    mut read: Vec<Option<Vec<u8>>>,
) -> bd3lm_kvstore::Result<Vec<Option<Vec<u8>>>> {
    let missing: Vec<usize> = (read.iter().enumerate())
        .filter(|(_, b)| b.is_none())
        .map(|(i, _)| blocks.start + i)
        .collect();
    let (Some(&first), Some(&last)) = (missing.first(), missing.last()) else {
        return Ok(read);
    };
    let bs = loaded.model.config().block_size;
    let owner = record.owner.as_deref();
    let Some(addresses) = shared_prefix_addresses(&record.tokens, bs, last + 1, owner) else {
        return Ok(read);
    };
    let scope = loaded.prefix_scope();
    let shared = store
        .get_prefix_blobs(scope, &addresses, first..last + 1)
        .await?;
    for (block, blob) in (first..).zip(shared) {
        let slot = &mut read[block - blocks.start];
        if slot.is_none() {
            *slot = blob;
        }
    }
    Ok(read)
}

/// The cache of `blobs` once each has passed its checksum and belongs to this model
/// state, block and tokens; `None` otherwise (logged and counted: rebuilt from tokens).
fn decode(loaded: &LoadedModel, blobs: StoredBlobs) -> Option<KvCache> {
    let StoredBlobs {
        blocks,
        prefix_hashes,
        bytes,
        rejected,
    } = blobs;
    let end = blocks.end * loaded.model.config().block_size;
    // Checksums over megabytes: on the pool's threads, all at once.
    let decoded: Vec<_> = bytes.into_par_iter().map(BlockBlob::decode).collect();
    let mut payloads = Vec::with_capacity(decoded.len());
    for ((index, blob), prefix_hash) in blocks.zip(decoded).zip(prefix_hashes) {
        let refused = match blob {
            Ok(blob) if blob_fits(&blob, loaded, index, prefix_hash) => {
                payloads.push(blob.payload);
                continue;
            }
            Ok(blob) => {
                tracing::warn!(block = index, model = %blob.model_id, fingerprint = %blob.fingerprint, "KV blob of another model state, block or tokens; rebuilding");
                "mismatch"
            }
            Err(e) => {
                tracing::warn!(block = index, error = %e, "corrupt KV blob; rebuilding");
                "corrupt"
            }
        };
        return refuse(&rejected, refused);
    }
    match import(loaded, &payloads, end) {
        Ok(cache) => Some(cache),
        Err(refused) => refuse(&rejected, refused),
    }
}

/// Counts a refused blob (`reason`: corrupt or mismatch); the cache is then rebuilt.
fn refuse(rejected: &AtomicU64, reason: &'static str) -> Option<KvCache> {
    rejected.fetch_add(1, Ordering::Relaxed);
    metrics::blob_rejected(reason);
    None
}

fn blob_fits(blob: &BlockBlob, loaded: &LoadedModel, index: usize, prefix_hash: u64) -> bool {
    blob.model_id == loaded.model_id
        && blob.fingerprint == loaded.fingerprint
        && blob.block_index == index as u64
        && blob.prefix_hash == prefix_hash
}

/// The cache of the decoded `payloads`, which must end at position `end` and hold the
/// model's KV precision; else why they were refused (corrupt or mismatch).
fn import(loaded: &LoadedModel, payloads: &[Vec<u8>], end: usize) -> Result<KvCache, &'static str> {
    let parts: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let cache = if parts.is_empty() {
        loaded.model.new_cache(1)
    } else {
        KvCache::import(&parts, loaded.model.device())
    };
    match cache {
        Ok(c) if c.next_position() != end => {
            tracing::warn!(
                end = c.next_position(),
                "KV blobs end at the wrong position; rebuilding"
            );
            Err("mismatch")
        }
        Ok(c) if c.dtype() != loaded.model.kv_dtype() => {
            tracing::warn!(kv_dtype = ?c.dtype(), "KV blobs of another precision; rebuilding");
            Err("mismatch")
        }
        Ok(c) => Ok(c),
        Err(e) => {
            tracing::warn!(error = %e, "KV blob payload rejected; rebuilding");
            Err("corrupt")
        }
    }
}
