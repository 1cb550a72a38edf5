//! Recent sessions' KV caches kept in memory, least recently used first out, within a
//! byte budget.

use std::collections::HashMap;
use std::sync::Mutex;

use bd3lm_model::KvCache;

/// A session's state between two blocks.
pub struct Held {
    /// Every token of the session as committed by this worker.
    pub tokens: Vec<u32>,
    /// Committed tokens (whole blocks).
    pub committed: usize,
    /// The KV cache after the committed tokens.
    pub cache: KvCache,
}

struct Entry {
    held: Held,
    bytes: usize,
    used: u64,
}

/// The in-memory session caches.
pub struct SessionCaches {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    bytes: usize,
    clock: u64,
}

impl SessionCaches {
    /// An empty set of caches holding at most `budget` bytes of keys and values.
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the session's state out (a session is served by one request at a time).
    pub fn take(&self, session: &str) -> Option<Held> {
        let mut inner = self.lock();
        let entry = inner.entries.remove(session)?;
        inner.bytes -= entry.bytes;
        Some(entry.held)
    }

    /// Keeps a session's state, evicting the least recently used ones beyond the budget.
    pub fn put(&self, session: String, held: Held) {
        let bytes = held.cache.live_bytes() + 4 * held.tokens.len();
        if bytes > self.budget {
            return;
        }
        let mut inner = self.lock();
        inner.clock += 1;
        let used = inner.clock;
        if let Some(old) = inner.entries.insert(session, Entry { held, bytes, used }) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
        while inner.bytes > self.budget {
            let Some(oldest) = inner
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let evicted = inner.entries.remove(&oldest).expect("present");
            inner.bytes -= evicted.bytes;
            tracing::debug!(session = %oldest, bytes = evicted.bytes, "evicted KV cache");
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_model::Config;
    use candle_core::{DType, Device};

    fn held() -> Held {
        let cfg = Config::new(64, 32, 4, 2, 16, 32, 4);
        Held {
            tokens: vec![1; 8],
            committed: 0,
            cache: KvCache::new(&cfg, 1, DType::F32, &Device::Cpu).unwrap(),
        }
    }

    #[test]
    fn evicts_least_recently_used_beyond_the_budget() {
        let caches = SessionCaches::new(80);
        caches.put("a".into(), held());
        caches.put("b".into(), held());
        assert_eq!(caches.bytes(), 64);
        caches.put("c".into(), held());
        assert!(caches.take("a").is_none(), "oldest evicted");
        assert!(caches.take("b").is_some());
        assert!(caches.take("c").is_some());
        assert_eq!(caches.bytes(), 0);
    }
}
