//! Batches of rows from a split of prepared shards, with a position that a resumed run
//! restores exactly.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};
use bd3lm_config::shards::{ShardEntry, ShardIndex, Split, read_shard};

/// Where a loader is in its data: the epoch, the shard (in the epoch's order) and the next
/// row (in the shard's order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Passes over the split completed.
    pub epoch: u64,
    /// Index into the epoch's shard order.
    pub shard: usize,
    /// Index into the shard's row order.
    pub row: usize,
}

/// Reads rows of one split, one shard in memory at a time. Shuffled loaders visit the
/// shards and the rows of each shard in an order drawn from `(seed, epoch)`; others read
/// everything in file order.
pub struct Loader {
    dir: PathBuf,
    index: ShardIndex,
    shards: Vec<ShardEntry>,
    shuffle: Option<u64>,
    position: Position,
    /// The shard being read: its place in the epoch order, ids and row order.
    current: Option<(usize, Vec<u32>, Vec<usize>)>,
}

impl Loader {
    /// A loader over `split` of the shard directory `dir`, shuffled with `shuffle`'s seed
    /// when given, starting at `position`.
    pub fn open(
        dir: &Path,
        split: Split,
        shuffle: Option<u64>,
        position: Position,
    ) -> Result<Self> {
        let index = ShardIndex::open(dir)?;
        let shards: Vec<ShardEntry> = index.shards(split).cloned().collect();
        if shards.is_empty() {
            return Err(Error::Shard {
                path: dir.join(bd3lm_config::shards::INDEX_FILE),
                reason: format!("no {} rows", split.name()),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            index,
            shards,
            shuffle,
            position,
            current: None,
        })
    }

    /// The index of the shard directory.
    pub fn index(&self) -> &ShardIndex {
        &self.index
    }

    /// The position of the next row.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Rows in the split.
    pub fn rows(&self) -> usize {
        self.shards.iter().map(|s| s.rows).sum()
    }

    /// The next `batch` rows, row-major; wraps into the next epoch at the end.
    pub fn next_batch(&mut self, batch: usize) -> Result<Vec<u32>> {
        let n = self.index.row_length;
        let mut out = Vec::with_capacity(batch * n);
        while out.len() < batch * n {
            let shard = self.position.shard;
            if self.current.as_ref().is_none_or(|(s, ..)| *s != shard) {
                self.current = Some(self.load(shard)?);
            }
            let (_, ids, order) = self.current.as_ref().expect("loaded above");
            let r = order[self.position.row];
            out.extend_from_slice(&ids[r * n..(r + 1) * n]);
            self.position.row += 1;
            if self.position.row == order.len() {
                self.position.row = 0;
                self.position.shard += 1;
                if self.position.shard == self.shards.len() {
                    self.position.shard = 0;
                    self.position.epoch += 1;
                    self.current = None;
                }
            }
        }
        Ok(out)
    }

    /// Reads the shard at place `slot` of the current epoch's order, with its row order.
    fn load(&self, slot: usize) -> Result<(usize, Vec<u32>, Vec<usize>)> {
        let mut shard_order: Vec<usize> = (0..self.shards.len()).collect();
        if let Some(seed) = self.shuffle {
            shard_order.shuffle(&mut self.rng(seed, u64::MAX));
        }
        let which = shard_order[slot];
        let entry = &self.shards[which];
        let ids = read_shard(&self.dir, &self.index, entry)?;
        let mut rows: Vec<usize> = (0..entry.rows).collect();
        if let Some(seed) = self.shuffle {
            rows.shuffle(&mut self.rng(seed, which as u64));
        }
        Ok((slot, ids, rows))
    }

    fn rng(&self, seed: u64, stream: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ self.position.epoch.rotate_left(32));
        rng.set_stream(stream);
        rng
    }
}
