//! Shared prompt prefixes: the keys and values of committed prompt blocks, held once in
//! worker memory ([`SharedKv`]) and taken read-only by every session whose prompt begins
//! with them, instead of computing them. They are found by content: the model state's
//! fingerprint, the block's index and its shared address (the hash of every token up to
//! its end, salted by the session's owner, see
//! [`bd3lm_kvstore::blob::shared_prefix_addresses`]). A block's keys and values depend on
//! nothing but the weights and the tokens up to its end, so what a session takes is the
//! computation's own bits; any other token, other weights or another owner is another
//! address.
//!
//! What is held is runs: the shared keys and values of one prompt's blocks, which answer
//! for each of their blocks (a run of blocks 0 to 127 serves a prompt that shares only its
//! first 75). Runs are counted in the budget once, however many sessions take them, and
//! the least recently used run that no session takes is evicted first; a run some session
//! still takes stays (its memory could not be freed) until the last one lets go of it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bd3lm_model::SharedKv;

use crate::lru::ByteLru;

/// A prompt block by content: the model state, the block, its shared address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Address {
    fingerprint: String,
    block: usize,
    shared: u64,
}

/// The runs and, for each block address, the run that answers for it.
struct Runs {
    lru: ByteLru<u64, Arc<SharedKv>>,
    index: HashMap<Address, u64>,
    /// Each run's addresses, to forget them with it.
    members: HashMap<u64, Vec<Address>>,
    next_id: u64,
}

/// The shared prompt blocks a worker holds.
pub struct PrefixCache {
    inner: Mutex<Runs>,
}

/// Whether any cache takes from `kv` (beyond the prefix cache's own handle).
fn taken(kv: &Arc<SharedKv>) -> bool {
    Arc::strong_count(kv) > 1
}

impl PrefixCache {
    /// An empty cache of at most `budget` bytes of runs no session takes.
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(Runs {
                lru: ByteLru::new(budget),
                index: HashMap::new(),
                members: HashMap::new(),
                next_id: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Runs> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The longest run of the prompt whose whole blocks have the shared `addresses`
    /// under `fingerprint` that this cache holds with the window before its end: that
    /// end (a block index) and the run. Nothing when none is held.
    pub fn longest(&self, fingerprint: &str, addresses: &[u64]) -> Option<(usize, Arc<SharedKv>)> {
        let mut runs = self.lock();
        runs.trim();
        for end in (1..=addresses.len()).rev() {
            let address = Address {
                fingerprint: fingerprint.to_string(),
                block: end - 1,
                shared: addresses[end - 1],
            };
            let Some(&id) = runs.index.get(&address) else {
                continue;
            };
            let kv = runs.lru.touch(&id)?;
            if kv.holds_window_before(end * kv.block_size()) {
                return Some((end, kv.clone()));
            }
        }
        None
    }

    /// Keeps `kv`, the shared keys and values of blocks of the prompt whose whole blocks
    /// have the shared `addresses`, under `fingerprint`: it answers for each of its
    /// blocks from now on. Runs no session takes are evicted, least recently used first,
    /// beyond the budget.
    pub fn insert(&self, fingerprint: &str, addresses: &[u64], kv: Arc<SharedKv>) {
        let bs = kv.block_size();
        let blocks = kv.first_position() / bs..(kv.end() / bs).min(addresses.len());
        let bytes = kv.bytes();
        let mut runs = self.lock();
        let id = runs.next_id;
        runs.next_id += 1;
        let evicted = runs.lru.insert_keeping(id, kv, bytes, taken);
        if !runs.lru.contains(&id) {
            return; // Larger than the whole budget: the session keeps it to itself.
        }
        let members: Vec<Address> = blocks
            .map(|block| Address {
                fingerprint: fingerprint.to_string(),
                block,
                shared: addresses[block],
            })
            .collect();
        for address in &members {
            runs.index.insert(address.clone(), id);
        }
        runs.members.insert(id, members);
        runs.forget(evicted);
    }

    /// Bytes of the runs held, taken or not.
    pub fn bytes(&self) -> usize {
        self.lock().lru.bytes()
    }
}

impl Runs {
    /// Evicts the runs no session takes any more beyond the budget.
    fn trim(&mut self) {
        let evicted = self.lru.trim(taken);
        self.forget(evicted);
    }

    /// Forgets the addresses of `evicted` runs that still name them.
    fn forget(&mut self, evicted: Vec<(u64, usize)>) {
        for (id, _) in evicted {
            crate::metrics::prefix_evicted();
            for address in self.members.remove(&id).unwrap_or_default() {
                if self.index.get(&address) == Some(&id) {
                    self.index.remove(&address);
                }
            }
        }
        crate::metrics::prefix_bytes(self.lru.bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_model::{Backbone, Config, KvCache, Shape};
    use candle_core::{DType, Device};

    /// A cache of the toy shape (blocks of 4, a window of 20) sharing `blocks` blocks.
    fn run(blocks: usize) -> (KvCache, Arc<SharedKv>) {
        let cfg = Config::new(Shape {
            vocab_size: 64,
            model_length: 24,
            block_size: 4,
            backbone: Backbone::TOY,
        });
        let model =
            bd3lm_model::checkpoint::random_model(&cfg, 0.1, 1, DType::F32, &Device::Cpu).unwrap();
        let mut cache = model.new_cache(1).unwrap();
        let ids: Vec<u32> = (0..blocks as u32 * 4).collect();
        let tokens = candle_core::Tensor::from_vec(ids, (1, blocks * 4), &Device::Cpu).unwrap();
        let sigma = candle_core::Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        model.commit(&tokens, &sigma, &mut cache).unwrap();
        let kv = cache.share().unwrap();
        (cache, kv)
    }

    /// A run answers for each of its blocks, under its own fingerprint and addresses
    /// only; a run a session takes is never evicted, and one no session takes goes once
    /// the budget needs its room, least recently used first.
    #[test]
    fn runs_answer_for_their_blocks_and_stay_while_taken() {
        let (session, kv) = run(3);
        let cache = PrefixCache::new(kv.bytes() * 2);
        cache.insert("f", &[100, 101, 102], kv);
        let (end, _) = cache.longest("f", &[100, 101, 102, 103]).unwrap();
        assert_eq!(end, 3);
        assert!(cache.longest("g", &[100, 101, 102]).is_none());
        // Another token in block 2: blocks 0 and 1 are the same.
        assert_eq!(cache.longest("f", &[100, 101, 202]).unwrap().0, 2);

        let (_, other) = run(3);
        cache.insert("f", &[200, 201, 202], other);
        let (_, third) = run(3);
        cache.insert("f", &[300, 301, 302], third);
        // Three runs in a budget of two: the second went, the first is taken.
        assert!(cache.longest("f", &[200]).is_none());
        let (end, held) = cache.longest("f", &[100]).unwrap();
        assert_eq!(end, 1);
        assert!(cache.longest("f", &[300]).is_some());
        drop((session, held));
        let (_, fourth) = run(3);
        cache.insert("f", &[400, 401, 402], fourth);
        assert!(
            cache.longest("f", &[100]).is_none(),
            "freed once its last session let go"
        );
        assert_eq!(cache.bytes(), 2 * run(3).1.bytes());
    }
}
