//! A map that keeps what fits in a byte budget, least recently used out first: the
//! worker's session caches and its shared prefix cache.

use std::collections::HashMap;
use std::hash::Hash;

struct Entry<V> {
    value: V,
    bytes: usize,
    used: u64,
}

/// Values with their sizes, within a byte budget.
pub struct ByteLru<K, V> {
    budget: usize,
    entries: HashMap<K, Entry<V>>,
    bytes: usize,
    clock: u64,
}

impl<K: Eq + Hash + Clone, V> ByteLru<K, V> {
    /// An empty map of at most `budget` bytes.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            entries: HashMap::new(),
            bytes: 0,
            clock: 0,
        }
    }

    /// Keeps `value` of `bytes` under `key` (replacing what was there), unless it alone
    /// exceeds the budget; returns the least recently used entries evicted to stay
    /// within it, with their bytes.
    pub fn insert(&mut self, key: K, value: V, bytes: usize) -> Vec<(K, usize)> {
        self.insert_keeping(key, value, bytes, |_| false)
    }

    /// [`ByteLru::insert`], never evicting an entry whose value is `kept` (which may
    /// leave the map over its budget until they are no longer kept).
    pub fn insert_keeping(
        &mut self,
        key: K,
        value: V,
        bytes: usize,
        kept: impl Fn(&V) -> bool,
    ) -> Vec<(K, usize)> {
        if bytes > self.budget {
            return Vec::new();
        }
        self.clock += 1;
        let entry = Entry {
            value,
            bytes,
            used: self.clock,
        };
        if let Some(old) = self.entries.insert(key, entry) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        self.trim(kept)
    }

    /// Evicts the least recently used entries whose values are not `kept` while the map
    /// is over its budget; returns them with their bytes.
    pub fn trim(&mut self, kept: impl Fn(&V) -> bool) -> Vec<(K, usize)> {
        let mut evicted = Vec::new();
        while self.bytes > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .filter(|(_, e)| !kept(&e.value))
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let gone = self.entries.remove(&oldest).expect("found above");
            self.bytes -= gone.bytes;
            evicted.push((oldest, gone.bytes));
        }
        evicted
    }

    /// Takes the value of `key` out, with its bytes.
    pub fn remove(&mut self, key: &K) -> Option<(V, usize)> {
        let entry = self.entries.remove(key)?;
        self.bytes -= entry.bytes;
        Some((entry.value, entry.bytes))
    }

    /// The value of `key`, now the most recently used.
    pub fn touch(&mut self, key: &K) -> Option<&V> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(key).map(|e| {
            e.used = now;
            &e.value
        })
    }

    /// Whether `key` is held (not a use).
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
