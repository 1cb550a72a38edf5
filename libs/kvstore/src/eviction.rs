//! What Redis may take from the stores when it reaches `maxmemory`, by its
//! `maxmemory-policy`, and the start-up check that refuses a policy that could lose the
//! training service's state.
//!
//! Session keys carry TTLs; the training service's do not. A `volatile-*` policy evicts
//! only keys with a TTL: KV blobs (rebuilt from tokens), whole or partial idle sessions
//! (gone as a whole: restored by a generation holding their tokens, else NOT_FOUND), but
//! also deleted sessions' tombstones, generation leases and per-key session counts. An
//! `allkeys-*` policy may evict anything, the job queue and the registry's records too.

use std::time::Duration;

use crate::{Error, Result, SessionStore};

/// Reads the Redis server's `maxmemory-policy` (waiting at most 2 s: a store that is down
/// is the services' to ride out, not the start-up's) and refuses one that may evict the
/// training service's keys; one that may evict sessions' keys is logged with what may go.
pub async fn check(sessions: &SessionStore) -> Result<()> {
    let read = tokio::time::timeout(Duration::from_secs(2), sessions.eviction_policy());
    let Ok(Some(policy)) = read.await else {
        if !sessions.is_memory() {
            tracing::info!(
                "Redis' maxmemory-policy could not be read (CONFIG refused or no answer)"
            );
        }
        return Ok(());
    };
    match Eviction::of(&policy) {
        Some(Eviction::AnyKey) => Err(Error::Misconfigured(format!(
            "Redis' maxmemory-policy is {policy}: under maxmemory it may evict the training              queue and the registry's records; use noeviction or a volatile-* policy"
        ))),
        Some(Eviction::SessionKeys) => {
            tracing::warn!(
                %policy,
                "under maxmemory Redis may evict KV blobs and idle sessions (rebuilt or \
                 restored), and also deleted sessions' tombstones, generation leases and \
                 per-key session counts"
            );
            Ok(())
        }
        Some(Eviction::Nothing) => Ok(()),
        None => {
            tracing::warn!(%policy, "unknown maxmemory-policy");
            Ok(())
        }
    }
}

/// What a `maxmemory-policy` may evict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// `noeviction`: nothing; writes fail when memory is full.
    Nothing,
    /// `volatile-*`: keys with a TTL, which are the sessions'.
    SessionKeys,
    /// `allkeys-*`: every key, the training service's too.
    AnyKey,
}

impl Eviction {
    /// What `policy` (a `maxmemory-policy` value) may evict; `None` for one this code
    /// does not know.
    pub fn of(policy: &str) -> Option<Self> {
        match policy {
            "noeviction" => Some(Self::Nothing),
            p if p.starts_with("volatile-") => Some(Self::SessionKeys),
            p if p.starts_with("allkeys-") => Some(Self::AnyKey),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_policy_of_redis_is_classified() {
        assert_eq!(Eviction::of("noeviction"), Some(Eviction::Nothing));
        for p in [
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert_eq!(Eviction::of(p), Some(Eviction::SessionKeys), "{p}");
        }
        for p in ["allkeys-lru", "allkeys-lfu", "allkeys-random"] {
            assert_eq!(Eviction::of(p), Some(Eviction::AnyKey), "{p}");
        }
        assert_eq!(Eviction::of("sometimes"), None);
    }
}
