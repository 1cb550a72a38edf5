//! Recent sessions' KV caches kept in memory, least recently used first out, within a
//! byte budget that counts what the caches' buffers occupy (up to about twice their live
//! keys and values), not only what they hold.

use std::sync::Mutex;

use bd3lm_model::KvCache;

use crate::lru::ByteLru;
use crate::metrics;

/// A session's state between two blocks.
pub struct SessionState {
    /// Every token of the session as committed by this worker.
    pub tokens: Vec<u32>,
    /// Committed tokens (whole blocks).
    pub committed: usize,
    /// The KV cache after the committed tokens.
    pub cache: KvCache,
}

impl SessionState {
    /// The state of an open session.
    pub fn of(session: bd3lm_diffusion::Session) -> Self {
        let (tokens, _, committed, cache) = session.into_parts();
        Self {
            tokens,
            committed,
            cache,
        }
    }
}

/// The in-memory session caches.
pub struct SessionCaches {
    inner: Mutex<ByteLru<String, SessionState>>,
}

impl SessionCaches {
    /// An empty set of caches holding at most `budget` bytes of keys and values.
    pub fn new(budget: usize) -> Self {
        Self {
            inner: Mutex::new(ByteLru::new(budget)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ByteLru<String, SessionState>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the session's state out (a session is served by one request at a time).
    pub fn take(&self, session: &str) -> Option<SessionState> {
        let (state, bytes) = self.lock().remove(&session.to_string())?;
        metrics::cache_bytes(-(bytes as f64));
        Some(state)
    }

    /// Keeps a session's state, evicting the least recently used ones beyond the budget.
    pub fn put(&self, session: String, state: SessionState) {
        let bytes = state.cache.allocated_bytes() + 4 * state.tokens.capacity();
        let mut inner = self.lock();
        let before = inner.bytes();
        for (oldest, bytes) in inner.insert(session, state, bytes) {
            metrics::cache_eviction();
            tracing::debug!(session = %bd3lm_kvstore::record::short_id(&oldest), bytes, "evicted KV cache");
        }
        metrics::cache_bytes(inner.bytes() as f64 - before as f64);
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_model::{Backbone, Config, Shape, checkpoint};
    use candle_core::{DType, Device, Tensor};

    /// A session state after committing `tokens` tokens, and the bytes it occupies.
    fn session_state(tokens: usize) -> (SessionState, usize) {
        let cfg = Config::new(Shape {
            vocab_size: 64,
            model_length: 32,
            block_size: 4,
            backbone: Backbone::TOY,
        });
        let model = checkpoint::random_model(&cfg, 0.1, 1, DType::F32, &Device::Cpu).unwrap();
        let mut cache = model.new_cache(1).unwrap();
        // Block by block, as generation commits: the buffers grow ahead of the tokens.
        let zero = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        for block in 0..tokens / 4 {
            let ids: Vec<u32> = (0..4).map(|i| (block * 4 + i) as u32 % 60).collect();
            let x = Tensor::from_slice(&ids, (1, 4), &Device::Cpu).unwrap();
            model.commit(&x, &zero, &mut cache).unwrap();
        }
        let ids = vec![1; tokens];
        let bytes = cache.allocated_bytes() + 4 * ids.capacity();
        let state = SessionState {
            tokens: ids,
            committed: tokens,
            cache,
        };
        (state, bytes)
    }

    /// The oldest state goes first; the bytes gauge and the evictions counter follow.
    #[test]
    fn evicts_least_recently_used_beyond_the_budget() {
        let recorder = bd3lm_telemetry::metrics::recorder();
        let handle = recorder.handle();
        let (_, one) = session_state(8);
        let caches = SessionCaches::new(2 * one + one / 2);
        let gauge = || {
            let text = handle.render();
            bd3lm_telemetry::metrics::sample(&text, "bd3lm_kv_cache_bytes").unwrap_or(0.0)
        };
        ::metrics::with_local_recorder(&recorder, || {
            caches.put("a".into(), session_state(8).0);
            caches.put("b".into(), session_state(8).0);
            assert_eq!(caches.bytes(), 2 * one);
            assert_eq!(gauge(), (2 * one) as f64);
            caches.put("c".into(), session_state(8).0);
            assert_eq!(gauge(), (2 * one) as f64);
            assert!(caches.take("a").is_none(), "oldest evicted");
            assert!(caches.take("b").is_some());
            assert_eq!(gauge(), one as f64);
            assert!(caches.take("c").is_some());
        });
        assert_eq!(caches.bytes(), 0);
        assert_eq!(gauge(), 0.0);
        let evictions =
            bd3lm_telemetry::metrics::sample(&handle.render(), "bd3lm_kv_cache_evictions_total");
        assert_eq!(evictions, Some(1.0));
    }

    /// The budget counts the buffers a cache occupies, which exceed its live keys and
    /// values once it has grown.
    #[test]
    fn the_budget_counts_allocated_buffers() {
        let (state, bytes) = session_state(12);
        let (live, allocated) = (state.cache.live_bytes(), state.cache.allocated_bytes());
        assert!(
            live > 0 && allocated > live,
            "live {live}, allocated {allocated}"
        );
        let caches = SessionCaches::new(bytes);
        caches.put("a".into(), state);
        assert_eq!(caches.bytes(), bytes);
        let tight = SessionCaches::new(bytes - 1);
        tight.put("a".into(), session_state(12).0);
        assert_eq!(tight.bytes(), 0, "a state over the budget is not kept");
    }
}
