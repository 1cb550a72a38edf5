//! The commit to the store: the session record and the block's KV blobs in one
//! compare-and-set on the version the block was computed from (the commit point), then
//! the answer; a run's blocks are committed one after the other, each on the record the
//! one before it wrote. A block another worker committed first is answered as stored, so a
//! retried block is idempotent; a session that changed otherwise while the block ran
//! (a new prompt, a restore) is ABORTED, and the coordinator asks again.

use std::time::{Duration, Instant};

use bd3lm_kvstore::record::Base;
use bd3lm_kvstore::{CommitOutcome, SessionRecord, SessionStore};
use bd3lm_proto::status::from_store;
use bd3lm_proto::v1::DenoiseBlockResponse;
use tonic::Status;

use crate::block::BlockWork;
use crate::metrics;

/// Where a session's run stands at the store: the block its next work commits, on which
/// record.
pub struct BlockCommit {
    /// The next block's index.
    pub block: usize,
    /// The record the next block was computed from: the commit point.
    pub base: Base,
    /// Tokens per block.
    pub block_size: usize,
    /// Time taken to find or rebuild the session's KV cache, reported with the next block.
    pub cache_time: Duration,
}

/// Commits `work` where `at` stands and returns the answer; `at` then stands after it.
pub async fn commit(
    store: &SessionStore,
    work: BlockWork,
    at: &mut BlockCommit,
) -> Result<DenoiseBlockResponse, Status> {
    let (block, block_size) = (at.block, at.block_size);
    let cache_time = std::mem::take(&mut at.cache_time);
    let started = Instant::now();
    let written = work.blobs.iter().map(|(_, blob)| blob.len()).sum();
    let outcome = store
        .commit(&work.record, at.base, work.blobs, work.expired)
        .await
        .map_err(from_store)?;
    let store_time = started.elapsed();
    let mut record = work.record;
    match outcome {
        CommitOutcome::Committed(version) => {
            record.version = version;
            at.base = record.base();
            at.block = record.committed_blocks;
            let effort = work.effort;
            let end = record.committed_blocks * block_size;
            let first = effort.first_block * block_size;
            let answer = DenoiseBlockResponse {
                block_index: effort.first_block as u32,
                token_ids: record.tokens.get(first..end).unwrap_or_default().to_vec(),
                committed_blocks: record.committed_blocks as u32,
                forward_passes: effort.forward_passes as u32,
                steps: effort.steps as u32,
                cache_ms: ms(cache_time),
                denoise_ms: ms(effort.denoise),
                commit_ms: ms(effort.commit + store_time),
                cache_source: effort.source.name().into(),
                already_committed: false,
                model_version: record.model_version,
                prefix_blocks: effort.reused as u32,
            };
            tracing::debug!(
                source = effort.source.name(),
                cache_ms = answer.cache_ms,
                denoise_ms = answer.denoise_ms,
                "block committed"
            );
            let took = cache_time + effort.denoise + effort.commit + store_time;
            metrics::block_committed(effort.source, took, effort.forward_passes, end - first);
            metrics::blob_written(written);
            Ok(answer)
        }
        CommitOutcome::Superseded(current) if current.committed_blocks > block => {
            tracing::info!(block, "block committed by another worker first");
            committed_answer(&current, block, block_size)
        }
        CommitOutcome::Superseded(_) => {
            tracing::info!(block, "the session changed while the block ran");
            Err(changed())
        }
    }
}

/// The committed block `block` of `record`, as an answer. A stored record holding fewer
/// tokens than the block (it went backwards, or was written by something else) is
/// ABORTED: another worker retries against the record as it is then.
pub fn committed_answer(
    record: &SessionRecord,
    block: usize,
    block_size: usize,
) -> Result<DenoiseBlockResponse, Status> {
    let start = block * block_size;
    // A committed block is whole: a record holding less of it is broken, not short.
    let Some(tokens) = record.tokens.get(start..start + block_size) else {
        tracing::warn!(
            block,
            committed = record.committed_blocks,
            tokens = record.tokens.len(),
            "the stored session holds fewer tokens than its committed blocks"
        );
        return Err(changed());
    };
    Ok(DenoiseBlockResponse {
        block_index: block as u32,
        token_ids: tokens.to_vec(),
        committed_blocks: record.committed_blocks as u32,
        already_committed: true,
        cache_source: "none".into(),
        model_version: record.model_version,
        ..Default::default()
    })
}

/// The block's base is gone: the coordinator asks again, against the record as it is.
fn changed() -> Status {
    Status::aborted("block_index: the session changed while the block ran")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
