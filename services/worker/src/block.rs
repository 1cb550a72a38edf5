//! The block's work, CPU- or GPU-bound (run on a blocking thread): the prompt's whole
//! blocks committed at once for a new session, else one block denoised and committed,
//! and the KV blobs of what was committed.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bd3lm_kvstore::{BlockBlob, SessionRecord};

use crate::Loaded;
use crate::cache::{self, CacheSource, Found};
use crate::sessions::Held;

/// What the block's work produced, before the commit to the store.
pub struct BlockWork {
    /// The worker's state after the block, kept in memory once committed.
    pub held: Held,
    /// The session record to commit.
    pub record: SessionRecord,
    /// KV blobs of the committed blocks still inside the window: (block index, bytes).
    pub blobs: Vec<(usize, Vec<u8>)>,
    /// First block committed.
    pub first_block: usize,
    /// Where the cache came from.
    pub source: CacheSource,
    /// Denoising forward passes.
    pub forward_passes: usize,
    /// Denoising steps.
    pub steps: usize,
    /// Time spent denoising.
    pub denoise: Duration,
    /// Time of the commit pass (or of the prefill).
    pub commit: Duration,
}

/// Denoises (or prefills) the next block of `record` on the cache `found`; `cancel` is
/// checked between denoising steps.
pub fn run(
    loaded: &Loaded,
    record: &SessionRecord,
    found: Found,
    cancel: &AtomicBool,
) -> bd3lm_diffusion::Result<BlockWork> {
    let bs = loaded.model.config().block_size;
    let (mut session, source) = cache::open(loaded, record, found)?;
    let first_block = session.next_block_index();
    let started = Instant::now();
    let (blocks, denoised) = match session.prefill()? {
        0 => (
            1,
            Some(session.next_block(&record.sampling, record.seed, Some(cancel))?),
        ),
        n => (n, None),
    };
    let prefill = started.elapsed();
    let blobs = blobs(loaded, session.cache(), first_block..first_block + blocks)?;
    let (tokens, _, committed, cache) = session.into_parts();
    let mut next = record.clone();
    next.tokens = tokens.clone();
    next.committed_blocks = committed / bs;
    Ok(BlockWork {
        held: Held {
            tokens,
            committed,
            cache,
        },
        record: next,
        blobs,
        first_block,
        source,
        forward_passes: denoised.as_ref().map_or(0, |r| r.forward_passes),
        steps: denoised.as_ref().map_or(0, |r| r.steps),
        denoise: denoised.as_ref().map_or(Duration::ZERO, |r| r.denoise),
        commit: denoised.map_or(prefill, |r| r.commit),
    })
}

/// The KV blobs of `blocks`, skipping those that slid out of the window during a long
/// prefill (they are never needed again).
fn blobs(
    loaded: &Loaded,
    cache: &bd3lm_model::KvCache,
    blocks: std::ops::Range<usize>,
) -> bd3lm_diffusion::Result<Vec<(usize, Vec<u8>)>> {
    let bs = loaded.model.config().block_size;
    let mut out = Vec::new();
    for b in blocks.filter(|b| b * bs >= cache.first_position()) {
        let blob = BlockBlob {
            model_id: loaded.model_id.clone(),
            fingerprint: loaded.fingerprint.clone(),
            block_index: b as u64,
            payload: cache.export(b * bs, bs)?,
        };
        out.push((b, blob.encode()));
    }
    Ok(out)
}
