//! The block's work outside the batch (run on a blocking thread): opening the session
//! (a rebuild from tokens is compute) and, for a new session, committing the prompt's
//! whole blocks; then, once blocks are committed, the KV blobs and the record to store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bd3lm_diffusion::Session;
use bd3lm_kvstore::blob::prefix_hashes;
use bd3lm_kvstore::{BlockBlob, SessionRecord};
use bd3lm_model::{KvCache, SharedKv};

use crate::LoadedModel;
use crate::cache::{self, CacheLookup, CacheSource, SharedPrompt};
use crate::sessions::SessionState;

/// What the block's work produced, before the commit to the store.
pub struct BlockWork {
    /// The session record to commit.
    pub record: SessionRecord,
    /// KV blobs of the committed blocks still inside the window: (block index, bytes).
    pub blobs: Vec<(usize, Vec<u8>)>,
    /// Blocks whose blobs slid out of the window with this commit: deleted with it.
    pub expired: std::ops::Range<usize>,
    /// What it took.
    pub effort: Effort,
    /// Whether the session's run ends with it.
    pub ends_run: bool,
    /// Blobs of the first prompt's blocks it computed, to be shared.
    pub shared: Option<SharedBlocks>,
}

/// A first prompt's blocks a session committed, to be shared: its keys and values for
/// the prefix cache (the session's cache takes them from there too) and the blobs the
/// store's shared blocks lack.
pub struct SharedBlocks {
    /// The shared addresses of the prompt's whole blocks.
    pub addresses: Vec<u64>,
    /// The keys and values of its live blocks, when they were not shared already.
    pub kv: Option<Arc<SharedKv>>,
    /// (Block index, bytes) of those still in the window that the store lacks, when
    /// they go there.
    pub blobs: Vec<(usize, Vec<u8>)>,
}

/// What a block's work took.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// First block committed.
    pub first_block: usize,
    /// Where the cache came from.
    pub source: CacheSource,
    /// Prompt blocks taken from the shared prefix cache.
    pub reused: usize,
    /// Denoising forward passes.
    pub forward_passes: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Time from joining the batch to the block's last denoising step.
    pub denoise: Duration,
    /// Time of the commit pass (or of the prefill).
    pub commit: Duration,
}

/// A session opened for its next block.
pub enum Prepared {
    /// A new session's prompt held whole blocks, now committed: the run's first work, and
    /// the session's state after it.
    Prefilled(Box<BlockWork>, SessionState),
    /// The cache holds every committed block; the next block is to be denoised.
    Ready(SessionState, CacheSource),
}

/// Where a session's committed prompt blocks go: their blobs to the store (with their
/// record); their keys and values to the shared prompt blocks, and their blobs with them
/// to the store's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Writes {
    /// Blobs to the store.
    pub store: bool,
    /// Keys and values to the shared prompt blocks.
    pub prefix: bool,
    /// Blobs to the store's shared prompt blocks.
    pub prefix_in_store: bool,
}

/// Opens the session of `record` on the cache `lookup` (rebuilding it from tokens when
/// nothing was found) and commits a new session's whole prompt blocks not taken from the
/// shared ones, their KV blobs going where `writes` says; `stored` says which of the
/// prompt's whole blocks the store's shared blocks hold already.
pub fn prepare(
    loaded: &LoadedModel,
    record: &SessionRecord,
    lookup: CacheLookup,
    writes: Writes,
    stored: &[bool],
) -> bd3lm_diffusion::Result<Prepared> {
    let (mut session, source) = cache::open(loaded, record, lookup)?;
    // Blocks imported from the prefix cache are this request's to commit, as computed
    // ones are.
    let first_block = record.committed_blocks;
    let reused = session.next_block_index() - first_block;
    let started = Instant::now();
    session.prefill()?;
    let end = session.next_block_index();
    if end == first_block {
        return Ok(Prepared::Ready(SessionState::of(session), source));
    }
    let effort = Effort {
        first_block,
        source,
        reused,
        forward_passes: 0,
        steps: 0,
        denoise: Duration::ZERO,
        commit: started.elapsed(),
    };
    // A new session's prompt blocks go to the store's shared blocks, not its own.
    let shares = writes.prefix && first_block == 0;
    let own_blobs = writes.store && !(shares && writes.prefix_in_store);
    let mut work = finish(loaded, record, &session, effort, own_blobs)?;
    let mut state = SessionState::of(session);
    if shares {
        work.shared = share(loaded, record, &mut state, stored, writes)?;
    }
    Ok(Prepared::Prefilled(Box::new(work), state))
}

/// The shared blocks of a new session's committed prompt (of `record`'s first prompt):
/// its live keys and values, moved into shared ones its cache takes from unless they
/// are shared already; and, when `writes` sends them to the store, the blobs of its
/// blocks still in the window that the store's shared blocks lack (`stored`).
fn share(
    loaded: &LoadedModel,
    record: &SessionRecord,
    state: &mut SessionState,
    stored: &[bool],
    writes: Writes,
) -> bd3lm_diffusion::Result<Option<SharedBlocks>> {
    let bs = loaded.model.config().block_size;
    let Some(prompt) = SharedPrompt::of(record, bs) else {
        return Ok(None);
    };
    let blobs = if writes.prefix_in_store {
        let lacks = |b: &usize| !stored.get(*b).copied().unwrap_or(false);
        let (first, end) = (state.cache.first_position() / bs, state.committed / bs);
        let from = (first..end).find(lacks).unwrap_or(end);
        let exported = window_blobs(loaded, &state.tokens, &state.cache, from..end)?;
        exported.into_iter().filter(|(b, _)| lacks(b)).collect()
    } else {
        Vec::new()
    };
    let kv = match state.cache.is_shared() {
        true => None,
        false => Some(state.cache.share()?),
    };
    Ok(Some(SharedBlocks {
        addresses: prompt.addresses,
        kv,
        blobs,
    }))
}

/// The work of `session` (of `record` before it) after it committed the blocks from
/// `effort.first_block` on: the record to store and, when `write_blobs`, the blobs of
/// those blocks.
pub fn finish(
    loaded: &LoadedModel,
    record: &SessionRecord,
    session: &Session,
    effort: Effort,
    write_blobs: bool,
) -> bd3lm_diffusion::Result<BlockWork> {
    let cfg = loaded.model.config();
    let bs = cfg.block_size;
    let end = session.next_block_index();
    let blobs = if write_blobs {
        window_blobs(
            loaded,
            session.tokens(),
            session.cache(),
            effort.first_block..end,
        )?
    } else {
        Vec::new()
    };
    // A next block reads the blobs of the window's blocks before it, no older ones.
    let window = cfg.kv_window() / bs;
    let expired = record.committed_blocks.saturating_sub(window)..end.saturating_sub(window);
    let mut next = record.clone();
    next.tokens = session.tokens().to_vec();
    next.committed_blocks = session.committed() / bs;
    Ok(BlockWork {
        record: next,
        blobs,
        expired,
        effort,
        ends_run: false,
        shared: None,
    })
}

/// The KV blobs of the committed `blocks` of a session with `tokens` and `cache`, skipping
/// those that slid out of the window (they are never needed again).
pub fn window_blobs(
    loaded: &LoadedModel,
    tokens: &[u32],
    cache: &KvCache,
    blocks: std::ops::Range<usize>,
) -> bd3lm_diffusion::Result<Vec<(usize, Vec<u8>)>> {
    let bs = loaded.model.config().block_size;
    let hashes = prefix_hashes(tokens, bs, blocks.clone())
        .ok_or_else(|| bd3lm_diffusion::Error::Batch("a committed block past the tokens".into()))?;
    let mut out = Vec::new();
    for (b, prefix_hash) in blocks.zip(hashes) {
        if b * bs < cache.first_position() {
            continue;
        }
        let blob = BlockBlob {
            model_id: loaded.model_id.clone(),
            fingerprint: loaded.fingerprint.clone(),
            block_index: b as u64,
            prefix_hash,
            payload: cache.export(b * bs, bs)?,
        };
        out.push((b, blob.encode()));
    }
    Ok(out)
}
