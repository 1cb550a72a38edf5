//! Shared prompt prefixes: the KV blobs of committed prompt blocks, addressed by content
//! (the model state's fingerprint, the block's index and the hash of every token up to
//! its end), so that a new session whose prompt begins with blocks another session
//! already committed imports their keys and values instead of computing them. A block's
//! keys and values depend on nothing but the weights and the tokens up to its end, so the
//! import is the computation's own bits; any other token, or other weights, is another
//! address. Entries are least recently used first out within a byte budget.

use std::sync::Mutex;

use crate::lru::ByteLru;

/// Where a prompt block's blob is kept: the model state, the block, its token prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Address {
    fingerprint: String,
    block: usize,
    prefix_hash: u64,
}

/// The prompt blocks' blobs a worker keeps.
pub struct PrefixCache {
    inner: Mutex<ByteLru<Address, Vec<u8>>>,
}

impl PrefixCache {
    /// An empty cache of at most `budget` bytes of blobs.
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(ByteLru::new(budget)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByteLru<Address, Vec<u8>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The blobs of the longest run of blocks this cache holds for a prompt whose
    /// whole blocks have `prefix_hashes` (block `i` the hash of the tokens up to its end)
    /// under `fingerprint`: the run ends at the returned block, and holds its last
    /// `window` blocks (those a next block attends to). Nothing when no run is held.
    pub fn longest(
        &self,
        fingerprint: &str,
        prefix_hashes: &[u64],
        window: usize,
    ) -> Option<(usize, Vec<Vec<u8>>)> {
        let mut inner = self.lock();
        let held = |block: usize| Address {
            fingerprint: fingerprint.to_string(),
            block,
            prefix_hash: prefix_hashes[block],
        };
        let end = (1..=prefix_hashes.len())
            .rev()
            .find(|&end| (end.saturating_sub(window)..end).all(|b| inner.contains(&held(b))))?;
        let blobs = (end.saturating_sub(window)..end)
            .map(|b| inner.touch(&held(b)).expect("checked above").clone())
            .collect();
        Some((end, blobs))
    }

    /// Keeps the blobs of prompt blocks (index, prefix hash, blob) under `fingerprint`,
    /// evicting the least recently used beyond the budget.
    pub fn insert(&self, fingerprint: &str, blocks: Vec<(usize, u64, Vec<u8>)>) {
        let mut inner = self.lock();
        for (block, prefix_hash, blob) in blocks {
            let address = Address {
                fingerprint: fingerprint.to_string(),
                block,
                prefix_hash,
            };
            let bytes = blob.len();
            for _ in inner.insert(address, blob, bytes) {
                crate::metrics::prefix_evicted();
            }
        }
        crate::metrics::prefix_bytes(inner.bytes());
    }

    /// Bytes of blobs held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run is found only whole (its last `window` blocks), only under its own
    /// fingerprint and hashes, and the least recently used goes first.
    #[test]
    fn runs_are_found_whole_and_evicted_oldest_first() {
        let cache = PrefixCache::new(30);
        let blob = |b: u8| vec![b; 10];
        cache.insert(
            "f",
            vec![(0, 100, blob(0)), (1, 101, blob(1)), (2, 102, blob(2))],
        );
        let (end, blobs) = cache.longest("f", &[100, 101, 102, 103], 2).unwrap();
        assert_eq!((end, blobs), (3, vec![blob(1), blob(2)]));
        assert!(cache.longest("g", &[100, 101, 102], 2).is_none());
        // Another token in block 2: the prefix of blocks 0 and 1 is the same.
        let (end, _) = cache.longest("f", &[100, 101, 202], 2).unwrap();
        assert_eq!(end, 2);
        // Block 2 was used longest ago: it goes as another comes.
        cache.insert("f", vec![(5, 105, blob(5))]);
        assert_eq!(cache.bytes(), 30);
        assert_eq!(cache.longest("f", &[100, 101, 102], 2).unwrap().0, 2);
    }
}
