//! What Redis may take from the stores when it reaches `maxmemory`, by its
//! `maxmemory-policy`, and the start-up check that refuses a policy that could lose what
//! cannot be rebuilt.
//!
//! Only what can be rebuilt or restored carries a Redis TTL: sessions' KV blobs (rebuilt
//! from tokens), records and tokens (a session gone, whole or in part, is put back by a
//! generation holding its tokens, else NOT_FOUND). Tombstones, leases and per-key session
//! counts hold their expiry in their values (the janitor deletes them), and the training
//! service's keys do not expire. So a `volatile-*` policy, the one the chart sets, evicts
//! only the former; an `allkeys-*` policy may evict anything, the job queue and the
//! registry's records too.

use std::time::Duration;

use crate::{Error, Result, SessionStore};

/// Reads the Redis server's `maxmemory-policy` (waiting at most 2 s: a store that is down
/// is the services' to ride out, not the start-up's) and refuses one that may evict what
/// cannot be rebuilt; one that evicts sessions' rebuildable keys is logged with what goes.
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
            "Redis' maxmemory-policy is {policy}: under maxmemory it may evict the training \
             queue, the registry's records and deleted sessions' tombstones; use noeviction \
             or a volatile-* policy"
        ))),
        Some(Eviction::SessionKeys) => {
            tracing::info!(
                %policy,
                "under maxmemory Redis may evict sessions' KV blobs (rebuilt from tokens) \
                 and records and tokens (restored by their generation, else NOT_FOUND)"
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
    /// `volatile-*`: keys with a TTL: sessions' records, tokens and KV blobs.
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
