//! The session store: records, tokens, KV blobs, leases, tombstones and the per-key
//! session counts, in memory (one process) or in Redis (any number of coordinators and
//! workers).
//!
//! Keys live under one prefix, per model and session (`{prefix}:{model}:{{session}}:...`;
//! the braces keep a session's keys in one Redis Cluster slot): `record` (a hash of the
//! version and the metadata), `tokens` (appended to, never rewritten), `kv:{block}` (the
//! KV blobs of the window's blocks), `lease` (the generation that owns the session) and
//! `deleted` (a tombstone). Every write sets the TTL of what can be rebuilt or restored
//! (record, tokens, blobs: the keys a `volatile-*` eviction may take); the lease, the
//! tombstone and the per-key session counts hold their expiry in their values instead,
//! and the janitor ([`SessionStore::spawn_janitor`]) deletes them once expired.
//!
//! Shared prompt blocks (the prefix cache's blobs, content-addressed: see
//! [`crate::blob::shared_prefix_addresses`]) live beside the sessions, under
//! `{prefix}:{model}:prefix:{{family}}:{fingerprint}:{block}:{address}`, where `family` is
//! the address of the prompt's first block: the blocks of prompts that begin alike share
//! a Cluster slot, so one probe and one read serve a prompt. They carry the TTL, and a
//! worker that computes them again writes them again.
//!
//! Every write of a record is a compare-and-set on the version its writer read, in one
//! server-side script with the blobs it commits and the blobs it expires: a stale writer
//! changes nothing.

mod memory;
mod redis;

use std::ops::Range;
use std::time::Duration;

use crate::record::Base;
use crate::{Error, RedisConnection, Result, SessionRecord, StoreConfig};

use self::memory::MemorySessions;
use self::redis::RedisSessions;

/// Whose shared prompt blocks: the model, and the model state (weights, precisions,
/// configuration) that computed them.
#[derive(Debug, Clone, Copy)]
pub struct PrefixScope<'a> {
    /// The model id.
    pub model: &'a str,
    /// The model state's fingerprint.
    pub fingerprint: &'a str,
}

/// The outcome of a write of a session record.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    /// The record now holds the write; its new version.
    Committed(u64),
    /// Another writer wrote first; this is the record as stored.
    Superseded(Box<SessionRecord>),
}

/// The store of sessions and their KV blobs. Cloning is cheap and shares the store.
#[derive(Clone)]
pub struct SessionStore {
    prefix: String,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Memory(MemorySessions),
    Redis(RedisSessions),
}

/// The keys of one session.
struct Keys {
    record: String,
    tokens: String,
    lease: String,
    tombstone: String,
    /// Prefix of the blob keys (`{prefix}:{model}:{{session}}:kv:`).
    kv: String,
}

impl Keys {
    fn blob(&self, block: usize) -> String {
        format!("{}{block}", self.kv)
    }
}

/// One compare-and-set write, its keys resolved.
struct Write<'a> {
    record: &'a SessionRecord,
    base: Base,
    blobs: Vec<(String, Vec<u8>)>,
    expired: Vec<String>,
}

/// The result of a write: the new version, or the stored record it lost to (`None` when
/// there is none).
type Written = std::result::Result<u64, Option<SessionRecord>>;

impl SessionStore {
    /// An empty in-memory store: the embedded default.
    pub fn memory(config: StoreConfig) -> Self {
        Self {
            prefix: config.prefix,
            backend: Backend::Memory(MemorySessions::new(config.ttl)),
        }
    }

    /// The sessions on the Redis deployment `redis`.
    pub fn redis(redis: &RedisConnection, config: StoreConfig) -> Self {
        Self {
            backend: Backend::Redis(RedisSessions::new(redis.clone(), &config)),
            prefix: config.prefix,
        }
    }

    fn keys(&self, model: &str, session: &str) -> Keys {
        let base = format!("{}:{model}:{{{session}}}:", self.prefix);
        Keys {
            record: format!("{base}record"),
            tokens: format!("{base}tokens"),
            lease: format!("{base}lease"),
            tombstone: format!("{base}deleted"),
            kv: format!("{base}kv:"),
        }
    }

    fn owner_key(&self, model: &str, owner: &str) -> String {
        format!("{}:{model}:owner:{owner}", self.prefix)
    }

    /// Stores a new session at version 1, or at `record.version` when it is set (a
    /// session put back after the store lost it); returns the version stored. An
    /// existing id is [`Error::SessionExists`], a deleted one [`Error::Deleted`].
    #[tracing::instrument(skip_all)]
    pub async fn create_session(&self, record: &SessionRecord) -> Result<u64> {
        let keys = self.keys(&record.model_id, &record.id);
        let version = record.version.max(1);
        match &self.backend {
            Backend::Memory(m) => m.create(&keys, record, version)?,
            Backend::Redis(r) => r.create(&keys, record, version).await?,
        }
        Ok(version)
    }

    /// Reads a session record, tokens and version in one atomic read.
    #[tracing::instrument(skip_all)]
    pub async fn get_session(&self, model: &str, session: &str) -> Result<Option<SessionRecord>> {
        let keys = self.keys(model, session);
        match &self.backend {
            Backend::Memory(m) => Ok(m.record(&keys.record)),
            Backend::Redis(r) => r.get_record(&keys).await,
        }
    }

    /// Writes `record` if the stored one is still at `base` (the commit point): its
    /// tokens past `base.tokens` are appended, the `blobs` (block index, bytes) are
    /// written and the blobs of the `expired` blocks (slid out of the window: never read
    /// again) deleted, all or nothing. A stale base changes nothing and returns the
    /// stored record.
    #[tracing::instrument(skip_all, fields(version = base.version, blocks = blobs.len()))]
    pub async fn commit(
        &self,
        record: &SessionRecord,
        base: Base,
        blobs: Vec<(usize, Vec<u8>)>,
        expired: Range<usize>,
    ) -> Result<CommitOutcome> {
        if record.tokens.len() < base.tokens {
            return Err(Error::Corrupt(format!(
                "a write of {} tokens over {} stored ones",
                record.tokens.len(),
                base.tokens
            )));
        }
        let keys = self.keys(&record.model_id, &record.id);
        let write = Write {
            record,
            base,
            blobs: blobs.into_iter().map(|(b, v)| (keys.blob(b), v)).collect(),
            expired: expired.map(|b| keys.blob(b)).collect(),
        };
        let stored = match &self.backend {
            Backend::Memory(m) => m.commit(&keys, write)?,
            Backend::Redis(r) => r.commit(&keys, write).await?,
        };
        match stored {
            Ok(version) => Ok(CommitOutcome::Committed(version)),
            Err(None) => Err(Error::NoSession(record.id.clone())),
            Err(Some(current)) => Ok(CommitOutcome::Superseded(Box::new(current))),
        }
    }

    /// Writes `record` (new prompt tokens, parameters, returned count) if the stored one
    /// is still at `base`: [`SessionStore::commit`] without blobs.
    pub async fn update_session(
        &self,
        record: &SessionRecord,
        base: Base,
    ) -> Result<CommitOutcome> {
        self.commit(record, base, Vec::new(), 0..0).await
    }

    /// Reads the KV blobs of `blocks` of a session (pipelined reads, not one atomic
    /// read: a blob deleted meanwhile reads as missing); missing ones are `None`.
    #[tracing::instrument(skip(self, session, blocks), fields(count = blocks.len()))]
    pub async fn get_blobs(
        &self,
        model: &str,
        session: &str,
        blocks: &[usize],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let keys = self.keys(model, session);
        let keys: Vec<String> = blocks.iter().map(|&b| keys.blob(b)).collect();
        match &self.backend {
            Backend::Memory(m) => Ok(keys.iter().map(|k| m.bytes(k)).collect()),
            Backend::Redis(r) => r.get_blobs(&keys).await,
        }
    }

    /// The store keys of a prompt's shared whole blocks, block `i` at `addresses[i]`.
    fn prefix_keys(&self, scope: PrefixScope<'_>, addresses: &[u64]) -> Vec<String> {
        let Some(family) = addresses.first() else {
            return Vec::new();
        };
        let base = format!(
            "{}:{}:prefix:{{{family:016x}}}:{}",
            self.prefix, scope.model, scope.fingerprint
        );
        let key = |(block, address)| format!("{base}:{block}:{address:016x}");
        addresses.iter().enumerate().map(key).collect()
    }

    /// Keeps `blobs` (block index, bytes) of the shared prompt whose whole blocks have
    /// `addresses`, for the store's TTL: a cache that any worker of `scope` may read
    /// instead of computing them, evictable like the sessions' blobs.
    #[tracing::instrument(skip_all, fields(blocks = blobs.len()))]
    pub async fn put_prefix_blobs(
        &self,
        scope: PrefixScope<'_>,
        addresses: &[u64],
        blobs: Vec<(usize, Vec<u8>)>,
    ) -> Result<()> {
        let keys = self.prefix_keys(scope, addresses);
        let mut keyed = Vec::with_capacity(blobs.len());
        for (block, blob) in blobs {
            let key = keys.get(block).ok_or_else(|| {
                Error::Corrupt(format!(
                    "prompt block {block} past its {} addresses",
                    keys.len()
                ))
            })?;
            keyed.push((key.clone(), blob));
        }
        match &self.backend {
            Backend::Memory(m) => m.put_all(keyed),
            Backend::Redis(r) => r.put_prefix(keyed).await?,
        }
        Ok(())
    }

    /// Which of the shared prompt's whole blocks (block `i` at `addresses[i]`) the store
    /// holds.
    #[tracing::instrument(skip_all, fields(blocks = addresses.len()))]
    pub async fn held_prefix_blocks(
        &self,
        scope: PrefixScope<'_>,
        addresses: &[u64],
    ) -> Result<Vec<bool>> {
        let keys = self.prefix_keys(scope, addresses);
        match &self.backend {
            Backend::Memory(m) => Ok(keys.iter().map(|k| m.holds(k)).collect()),
            Backend::Redis(r) => r.held(&keys).await,
        }
    }

    /// The blobs of the shared prompt's `blocks` (block `i` at `addresses[i]`); missing
    /// ones are `None`.
    #[tracing::instrument(skip_all, fields(count = blocks.len()))]
    pub async fn get_prefix_blobs(
        &self,
        scope: PrefixScope<'_>,
        addresses: &[u64],
        blocks: Range<usize>,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        let keys = self.prefix_keys(scope, addresses);
        let Some(keys) = keys.get(blocks) else {
            return Err(Error::Corrupt("prompt blocks past their addresses".into()));
        };
        match &self.backend {
            Backend::Memory(m) => Ok(keys.iter().map(|k| m.bytes(k)).collect()),
            Backend::Redis(r) => r.get_blobs(keys).await,
        }
    }

    /// Deletes a session, its lease and its KV blobs, and leaves a tombstone (for the
    /// store's TTL) that refuses any later write or re-creation of it; false when it did
    /// not exist. The blobs follow the record as deleted, not as read before: a block
    /// committed in between (by a generation on another coordinator) loses its blob too.
    #[tracing::instrument(skip(self, session))]
    pub async fn delete_session(&self, model: &str, session: &str) -> Result<bool> {
        let keys = self.keys(model, session);
        let blobs = |blocks: Range<usize>| blocks.map(|b| keys.blob(b)).collect::<Vec<_>>();
        let mut doomed = vec![keys.record.clone(), keys.tokens.clone(), keys.lease.clone()];
        match &self.backend {
            Backend::Memory(m) => Ok(m.delete(&keys, doomed, blobs)),
            Backend::Redis(r) => {
                let read = r.get_record(&keys).await?;
                let read_blocks = read.map_or(0, |r| r.committed_blocks);
                doomed.extend(blobs(0..read_blocks));
                let Some(deleted) = r.delete(&keys.tombstone, &doomed).await? else {
                    return Ok(false);
                };
                // No commit follows the script (it needs the record), so this is final.
                r.unlink(&blobs(read_blocks..deleted.committed_blocks))
                    .await?;
                Ok(true)
            }
        }
    }

    /// Takes or renews the lease on a session for `owner`, for `ttl`: true when `owner`
    /// holds it now, false when another owner does.
    #[tracing::instrument(skip_all)]
    pub async fn lease(
        &self,
        model: &str,
        session: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool> {
        let key = self.keys(model, session).lease;
        match &self.backend {
            Backend::Memory(m) => Ok(m.lease(&key, owner, ttl)),
            Backend::Redis(r) => r.lease(&key, owner, ttl).await,
        }
    }

    /// Gives up `owner`'s lease on a session (nothing when another owner holds it).
    #[tracing::instrument(skip_all)]
    pub async fn release(&self, model: &str, session: &str, owner: &str) -> Result<()> {
        let key = self.keys(model, session).lease;
        match &self.backend {
            Backend::Memory(m) => m.release(&key, owner),
            Backend::Redis(r) => r.release(&key, owner).await?,
        }
        Ok(())
    }

    /// Counts `session` among the live sessions of the API key `owner` (until the store's
    /// TTL from now, renewed by every claim): false, counting nothing, when `owner` already
    /// holds `limit` other live sessions.
    #[tracing::instrument(skip_all)]
    pub async fn claim_slot(
        &self,
        model: &str,
        owner: &str,
        session: &str,
        limit: usize,
    ) -> Result<bool> {
        let key = self.owner_key(model, owner);
        match &self.backend {
            Backend::Memory(m) => Ok(m.claim_slot(&key, session, limit)),
            Backend::Redis(r) => r.claim_slot(&key, session, limit).await,
        }
    }

    /// Stops counting `session` among `owner`'s live sessions.
    #[tracing::instrument(skip_all)]
    pub async fn release_slot(&self, model: &str, owner: &str, session: &str) -> Result<()> {
        let key = self.owner_key(model, owner);
        match &self.backend {
            Backend::Memory(m) => m.release_slot(&key, session),
            Backend::Redis(r) => r.release_slot(&key, session).await?,
        }
        Ok(())
    }

    /// Deletes the expired tombstones and leases, which carry no Redis TTL (see the
    /// module's docs); how many. The memory store drops them itself (0).
    #[tracing::instrument(skip_all)]
    pub async fn sweep(&self) -> Result<usize> {
        match &self.backend {
            Backend::Memory(_) => Ok(0),
            Backend::Redis(r) => r.sweep().await,
        }
    }

    /// Sweeps ([`SessionStore::sweep`]) every `every` (give or take a tenth, so that the
    /// coordinators of a deployment spread their sweeps) for as long as the process
    /// runs; nothing for the memory store. Concurrent sweeps are harmless: each key's
    /// deletion checks its own expiry.
    pub fn spawn_janitor(&self, every: Duration) {
        if self.is_memory() {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                let jitter = every.mul_f64(rand::random_range(0.9..1.1));
                tokio::time::sleep(jitter).await;
                match store.sweep().await {
                    Ok(deleted) => crate::metrics::swept(deleted),
                    Err(e) => {
                        tracing::warn!(error = %e, "sweeping expired tombstones and leases failed")
                    }
                }
            }
        });
    }

    /// Whether the sessions live in this process's memory.
    pub fn is_memory(&self) -> bool {
        matches!(self.backend, Backend::Memory(_))
    }

    /// The Redis server's `maxmemory-policy`; `None` in memory or when it cannot be read.
    pub async fn eviction_policy(&self) -> Option<String> {
        match &self.backend {
            Backend::Memory(_) => None,
            Backend::Redis(r) => r.redis.eviction_policy().await,
        }
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<()> {
        match &self.backend {
            Backend::Memory(_) => Ok(()),
            Backend::Redis(r) => r.ping().await,
        }
    }

    /// Drops every key of the in-memory store, as a Redis `FLUSHALL` or an eviction
    /// would, for tests of what survives that (a Redis store is flushed by its server).
    #[cfg(any(test, feature = "contract"))]
    pub fn flush_memory(&self) {
        if let Backend::Memory(m) = &self.backend {
            m.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::record;

    #[tokio::test]
    async fn memory_store_keeps_the_contract() {
        crate::contract::check(SessionStore::memory(StoreConfig::default())).await;
    }

    #[tokio::test]
    async fn memory_entries_expire() {
        let store = SessionStore::memory(StoreConfig {
            ttl: Duration::from_millis(20),
            ..StoreConfig::default()
        });
        store.create_session(&record("s")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(store.get_session("m", "s").await.unwrap(), None);
        store.create_session(&record("s")).await.unwrap();
    }
}
