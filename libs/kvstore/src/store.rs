//! The store of session records and KV blobs: in memory (one process) or in Redis (any
//! number of coordinators and workers).
//!
//! Keys live under one prefix, per model and session: `{prefix}:{model}:{session}:record`
//! and `{prefix}:{model}:{session}:kv:{block}`. Every write sets the key's TTL; a session
//! is deleted with all its blobs.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::{Error, Result, SessionRecord};

/// Settings common to every store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Prefix of every key.
    pub prefix: String,
    /// Lifetime of a key after its last write.
    pub ttl: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            prefix: "bd3lm".into(),
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The outcome of committing blocks.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    /// The record now holds the new blocks.
    Committed,
    /// Another writer committed first; this is the record as stored.
    Superseded(SessionRecord),
}

/// A store of sessions and KV blobs. Cloning is cheap and shares the store.
#[derive(Clone)]
pub enum Store {
    /// Process-local maps: the embedded default.
    Memory(MemoryStore),
    /// A Redis server.
    Redis(RedisStore),
}

impl Store {
    /// An empty in-memory store.
    pub fn memory(config: StoreConfig) -> Self {
        Store::Memory(MemoryStore {
            config,
            entries: Arc::default(),
        })
    }

    /// A Redis store at `url` (`redis://host:port/db`). Connects lazily and reconnects on
    /// connection loss; each command times out instead of hanging.
    pub fn redis(url: &str, config: StoreConfig) -> Result<Self> {
        let client = redis::Client::open(url)
            // The URL may carry a password: the error names neither.
            .map_err(|e| Error::Unavailable(format!("invalid Redis URL ({:?})", e.kind())))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Store::Redis(RedisStore { config, manager }))
    }

    fn config(&self) -> &StoreConfig {
        match self {
            Store::Memory(m) => &m.config,
            Store::Redis(r) => &r.config,
        }
    }

    fn record_key(&self, model: &str, session: &str) -> String {
        format!("{}:{model}:{session}:record", self.config().prefix)
    }

    fn blob_key(&self, model: &str, session: &str, block: usize) -> String {
        format!("{}:{model}:{session}:kv:{block}", self.config().prefix)
    }

    /// Stores a new session; an existing id is an error.
    #[tracing::instrument(skip_all, fields(session = %record.id))]
    pub async fn create_session(&self, record: &SessionRecord) -> Result<()> {
        let key = self.record_key(&record.model_id, &record.id);
        let created = match self {
            Store::Memory(m) => m.set_if_absent(&key, record.to_bytes()),
            Store::Redis(r) => r.set_if_absent(&key, record.to_bytes()).await?,
        };
        if created {
            Ok(())
        } else {
            Err(Error::SessionExists(record.id.clone()))
        }
    }

    /// Reads a session record.
    #[tracing::instrument(skip(self))]
    pub async fn get_session(&self, model: &str, session: &str) -> Result<Option<SessionRecord>> {
        let key = self.record_key(model, session);
        let bytes = match self {
            Store::Memory(m) => m.get(&key),
            Store::Redis(r) => r.manager.clone().get::<_, Option<Vec<u8>>>(&key).await?,
        };
        bytes.map(|b| SessionRecord::from_bytes(&b)).transpose()
    }

    /// Replaces a session record when its committed block count is still `expected`
    /// (the commit point), after writing `blobs` (block index, bytes); with the commit,
    /// the blobs of the `expired` blocks (slid out of the window: never read again) are
    /// deleted. Blobs of a superseded commit are identical to the stored ones (same seed,
    /// same model).
    #[tracing::instrument(skip_all, fields(session = %record.id, expected, blocks = blobs.len()))]
    pub async fn commit(
        &self,
        record: &SessionRecord,
        expected: usize,
        blobs: Vec<(usize, Vec<u8>)>,
        expired: Range<usize>,
    ) -> Result<CommitOutcome> {
        let key = self.record_key(&record.model_id, &record.id);
        let blob_key = |b| self.blob_key(&record.model_id, &record.id, b);
        let blobs: Vec<(String, Vec<u8>)> = blobs
            .into_iter()
            .map(|(b, bytes)| (blob_key(b), bytes))
            .collect();
        let expired: Vec<String> = expired.map(blob_key).collect();
        let stored = match self {
            Store::Memory(m) => m.commit(&key, record, expected, blobs, &expired)?,
            Store::Redis(r) => r.commit(&key, record, expected, blobs, &expired).await?,
        };
        Ok(match stored {
            None => CommitOutcome::Committed,
            Some(current) => CommitOutcome::Superseded(current),
        })
    }

    /// Replaces a session record unconditionally (new prompt tokens, returned count).
    #[tracing::instrument(skip_all, fields(session = %record.id))]
    pub async fn put_session(&self, record: &SessionRecord) -> Result<()> {
        let key = self.record_key(&record.model_id, &record.id);
        match self {
            Store::Memory(m) => m.set(&key, record.to_bytes()),
            Store::Redis(r) => r.set(&key, record.to_bytes()).await?,
        }
        Ok(())
    }

    /// Reads the KV blobs of `blocks` of a session in one round trip; missing ones are
    /// `None`.
    #[tracing::instrument(skip(self, blocks), fields(count = blocks.len()))]
    pub async fn get_blobs(
        &self,
        model: &str,
        session: &str,
        blocks: &[usize],
    ) -> Result<Vec<Option<Vec<u8>>>> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = blocks
            .iter()
            .map(|&b| self.blob_key(model, session, b))
            .collect();
        match self {
            Store::Memory(m) => Ok(keys.iter().map(|k| m.get(k)).collect()),
            Store::Redis(r) => Ok(r.manager.clone().mget(&keys).await?),
        }
    }

    /// Deletes a session and its `blocks` KV blobs; false when it did not exist.
    #[tracing::instrument(skip(self))]
    pub async fn delete_session(&self, model: &str, session: &str, blocks: usize) -> Result<bool> {
        let mut keys = vec![self.record_key(model, session)];
        keys.extend((0..blocks).map(|b| self.blob_key(model, session, b)));
        match self {
            Store::Memory(m) => Ok(m.delete(&keys)),
            Store::Redis(r) => {
                let deleted: usize = r.manager.clone().del(&keys).await?;
                Ok(deleted > 0)
            }
        }
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => {
                let _: String = redis::cmd("PING")
                    .query_async(&mut r.manager.clone())
                    .await?;
                Ok(())
            }
        }
    }
}

/// Values by key, each with its expiry.
type Entries = HashMap<String, (Vec<u8>, Instant)>;

/// The in-memory store: a map with per-key expiry.
#[derive(Clone)]
pub struct MemoryStore {
    config: StoreConfig,
    entries: Arc<Mutex<Entries>>,
}

impl MemoryStore {
    fn map(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut map = self.map();
        match map.get(key) {
            Some((v, expiry)) if *expiry > Instant::now() => Some(v.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, map: &mut Entries, key: &str, value: Vec<u8>) {
        let now = Instant::now();
        // Expired entries are dropped as writes go by, so memory follows the live set.
        if map.len().is_multiple_of(64) {
            map.retain(|_, (_, expiry)| *expiry > now);
        }
        map.insert(key.to_string(), (value, now + self.config.ttl));
    }

    fn set(&self, key: &str, value: Vec<u8>) {
        let mut map = self.map();
        self.insert(&mut map, key, value);
    }

    fn set_if_absent(&self, key: &str, value: Vec<u8>) -> bool {
        let mut map = self.map();
        if map
            .get(key)
            .is_some_and(|(_, expiry)| *expiry > Instant::now())
        {
            return false;
        }
        self.insert(&mut map, key, value);
        true
    }

    fn commit(
        &self,
        key: &str,
        record: &SessionRecord,
        expected: usize,
        blobs: Vec<(String, Vec<u8>)>,
        expired: &[String],
    ) -> Result<Option<SessionRecord>> {
        let mut map = self.map();
        let current = match map.get(key) {
            Some((bytes, expiry)) if *expiry > Instant::now() => SessionRecord::from_bytes(bytes)?,
            _ => return Err(Error::NoSession(record.id.clone())),
        };
        if current.committed_blocks != expected {
            return Ok(Some(current));
        }
        for (k, v) in blobs {
            self.insert(&mut map, &k, v);
        }
        self.insert(&mut map, key, record.to_bytes());
        for k in expired {
            map.remove(k);
        }
        Ok(None)
    }

    fn delete(&self, keys: &[String]) -> bool {
        let mut map = self.map();
        keys.iter()
            .filter(|k| map.remove(k.as_str()).is_some())
            .count()
            > 0
    }
}

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    config: StoreConfig,
    manager: ConnectionManager,
}

/// Replaces the record (KEYS[1]) with ARGV[2] when its committed block count equals ARGV[1]
/// and deletes the expired blobs (KEYS[2..]); returns the stored record otherwise, and
/// false when there is none.
const COMMIT_SCRIPT: &str = r#"
local current = redis.call('GET', KEYS[1])
if not current then return false end
if cjson.decode(current).committed_blocks ~= tonumber(ARGV[1]) then return current end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
for i = 2, #KEYS do redis.call('UNLINK', KEYS[i]) end
return 'OK'
"#;

impl RedisStore {
    fn ttl_ms(&self) -> u64 {
        self.config.ttl.as_millis() as u64
    }

    async fn set(&self, key: &str, value: Vec<u8>) -> Result<()> {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(self.ttl_ms())
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(())
    }

    async fn set_if_absent(&self, key: &str, value: Vec<u8>) -> Result<bool> {
        let reply: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("NX")
            .arg("PX")
            .arg(self.ttl_ms())
            .query_async(&mut self.manager.clone())
            .await?;
        Ok(reply.is_some())
    }

    async fn commit(
        &self,
        key: &str,
        record: &SessionRecord,
        expected: usize,
        blobs: Vec<(String, Vec<u8>)>,
        expired: &[String],
    ) -> Result<Option<SessionRecord>> {
        let mut con = self.manager.clone();
        if !blobs.is_empty() {
            let mut pipe = redis::pipe();
            for (k, v) in &blobs {
                pipe.cmd("SET")
                    .arg(k)
                    .arg(v.as_slice())
                    .arg("PX")
                    .arg(self.ttl_ms())
                    .ignore();
            }
            let _: () = pipe.query_async(&mut con).await?;
        }
        let reply: Option<Vec<u8>> = redis::Script::new(COMMIT_SCRIPT)
            .key(key)
            .key(expired)
            .arg(expected)
            .arg(record.to_bytes())
            .arg(self.ttl_ms())
            .invoke_async(&mut con)
            .await?;
        match reply {
            None => Err(Error::NoSession(record.id.clone())),
            Some(bytes) if bytes == b"OK" => Ok(None),
            Some(bytes) => Ok(Some(SessionRecord::from_bytes(&bytes)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::record;

    #[tokio::test]
    async fn memory_store_keeps_the_contract() {
        crate::contract::check(Store::memory(StoreConfig::default())).await;
    }

    #[tokio::test]
    async fn memory_entries_expire() {
        let store = Store::memory(StoreConfig {
            ttl: Duration::from_millis(20),
            ..StoreConfig::default()
        });
        store.create_session(&record("s")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(store.get_session("m", "s").await.unwrap(), None);
        store.create_session(&record("s")).await.unwrap();
    }
}
