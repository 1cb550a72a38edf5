//! Shared prompt prefixes: the KV blobs of committed prompt blocks, addressed by content
//! (the model state's fingerprint, the block's index and its shared address: the hash of
//! every token up to its end, salted by the session's owner, see
//! [`bd3lm_kvstore::blob::shared_prefix_addresses`]), so that a new session whose prompt
//! begins with blocks another session already committed imports their keys and values
//! instead of computing them. A block's keys and values depend on nothing but the weights
//! and the tokens up to its end, so the import is the computation's own bits; any other
//! token, other weights or another owner is another address. Entries are least recently
//! used first out within a byte budget.

use std::sync::Mutex;

use crate::lru::ByteLru;

/// Where a prompt block's blob is kept: the model state, the block, its token prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Address {
    fingerprint: String,
    block: usize,
    shared: u64,
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
    /// whole blocks have the shared `addresses` under `fingerprint`: the run ends at the
    /// returned block, and holds its last `window` blocks (those a next block attends
    /// to). Nothing when no run is held.
    pub fn longest(
        &self,
        fingerprint: &str,
        addresses: &[u64],
        window: usize,
    ) -> Option<(usize, Vec<Vec<u8>>)> {
        let mut inner = self.lock();
        let address = |block: usize| Address {
            fingerprint: fingerprint.to_string(),
            block,
            shared: addresses[block],
        };
        let end = longest_run(addresses.len(), window, |b| inner.contains(&address(b)))?;
        let blobs = (end.saturating_sub(window)..end)
            .map(|b| inner.touch(&address(b)).expect("checked above").clone())
            .collect();
        Some((end, blobs))
    }

    /// Keeps `blobs` (block index, bytes) of the prompt whose whole blocks have the
    /// shared `addresses`, under `fingerprint`, evicting the least recently used beyond
    /// the budget.
    pub fn insert(&self, fingerprint: &str, addresses: &[u64], blobs: Vec<(usize, Vec<u8>)>) {
        let mut inner = self.lock();
        for (block, blob) in blobs {
            let Some(&shared) = addresses.get(block) else {
                continue;
            };
            let address = Address {
                fingerprint: fingerprint.to_string(),
                block,
                shared,
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

/// The end of the longest run of a prompt's `blocks` whose last `window` blocks are
/// all `held` (what a next block attends to); `None` when there is none.
pub fn longest_run(blocks: usize, window: usize, held: impl Fn(usize) -> bool) -> Option<usize> {
    (1..=blocks)
        .rev()
        .find(|&end| (end.saturating_sub(window)..end).all(&held))
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
        let blobs = vec![(0, blob(0)), (1, blob(1)), (2, blob(2))];
        cache.insert("f", &[100, 101, 102], blobs);
        let (end, blobs) = cache.longest("f", &[100, 101, 102, 103], 2).unwrap();
        assert_eq!((end, blobs), (3, vec![blob(1), blob(2)]));
        assert!(cache.longest("g", &[100, 101, 102], 2).is_none());
        // Another token in block 2: the prefix of blocks 0 and 1 is the same.
        let (end, _) = cache.longest("f", &[100, 101, 202], 2).unwrap();
        assert_eq!(end, 2);
        // Block 2 was used longest ago: it goes as another comes.
        cache.insert("f", &[100, 101, 102, 103, 104, 105], vec![(5, blob(5))]);
        assert_eq!(cache.bytes(), 30);
        assert_eq!(cache.longest("f", &[100, 101, 102], 2).unwrap().0, 2);
    }
}
