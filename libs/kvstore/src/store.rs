//! The store of session records and KV blobs: in memory (one process) or in Redis (any
//! number of coordinators and workers).
//!
//! Keys live under one prefix, per model and session (`{prefix}:{model}:{{session}}:...`;
//! the braces keep a session's keys in one Redis Cluster slot): `record` (a hash of the
//! version and the metadata), `tokens` (appended to, never rewritten), `kv:{block}` (the
//! KV blobs of the window's blocks), `lease` (the generation that owns the session) and
//! `deleted` (a tombstone). Every write sets the keys' TTL.
//!
//! Every write of a record is a compare-and-set on the version its writer read, in one
//! server-side script with the blobs it commits and the blobs it expires: a stale writer
//! changes nothing.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, Script};

use crate::metrics;
use crate::record::{Base, encode_tokens};
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

/// What a Redis connection needs beyond its URL.
#[derive(Default)]
pub struct RedisSecrets {
    /// The password (with the URL's user, if any), read from a file or the environment.
    pub password: Option<String>,
    /// PEM CA certificate of a `rediss://` server, instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

/// The outcome of a write of a session record.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    /// The record now holds the write; its new version.
    Committed(u64),
    /// Another writer wrote first; this is the record as stored.
    Superseded(Box<SessionRecord>),
}

/// A store of sessions and KV blobs. Cloning is cheap and shares the store.
#[derive(Clone)]
pub enum Store {
    /// Process-local maps: the embedded default.
    Memory(MemoryStore),
    /// A Redis server.
    Redis(RedisStore),
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

impl Store {
    /// An empty in-memory store.
    pub fn memory(config: StoreConfig) -> Self {
        Store::Memory(MemoryStore {
            config,
            entries: Arc::default(),
            jobs: Arc::default(),
        })
    }

    /// A Redis store at `url` (`redis://host:port/db`, or `rediss://` for TLS with the
    /// system's roots). Connects lazily and reconnects on connection loss; each command
    /// times out instead of hanging.
    pub fn redis(url: &str, config: StoreConfig) -> Result<Self> {
        Self::redis_with(url, RedisSecrets::default(), config)
    }

    /// [`Store::redis`] with a password kept out of the URL and, for `rediss://`, the CA
    /// the server's certificate must chain to.
    pub fn redis_with(url: &str, secrets: RedisSecrets, config: StoreConfig) -> Result<Self> {
        // The URL may carry a password: errors name neither.
        let invalid = |e: redis::RedisError| {
            Error::Unavailable(format!("invalid Redis URL ({:?})", e.kind()))
        };
        let mut info = url.into_connection_info().map_err(invalid)?;
        if let Some(password) = secrets.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match secrets.ca_pem {
            Some(root_cert) => {
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(info, certs)
            }
            None => redis::Client::open(info),
        }
        .map_err(invalid)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(Store::Redis(RedisStore { config, manager }))
    }

    pub(crate) fn config(&self) -> &StoreConfig {
        match self {
            Store::Memory(m) => &m.config,
            Store::Redis(r) => &r.config,
        }
    }

    fn keys(&self, model: &str, session: &str) -> Keys {
        let base = format!("{}:{model}:{{{session}}}:", self.config().prefix);
        Keys {
            record: format!("{base}record"),
            tokens: format!("{base}tokens"),
            lease: format!("{base}lease"),
            tombstone: format!("{base}deleted"),
            kv: format!("{base}kv:"),
        }
    }

    /// Stores a new session at version 1, or at `record.version` when it is set (a
    /// session put back after the store lost it); returns the version stored. An
    /// existing id is [`Error::SessionExists`], a deleted one [`Error::Deleted`].
    #[tracing::instrument(skip_all)]
    pub async fn create_session(&self, record: &SessionRecord) -> Result<u64> {
        let keys = self.keys(&record.model_id, &record.id);
        let version = record.version.max(1);
        match self {
            Store::Memory(m) => m.create(&keys, record, version)?,
            Store::Redis(r) => r.create(&keys, record, version).await?,
        }
        Ok(version)
    }

    /// Reads a session record, tokens and version in one atomic read.
    #[tracing::instrument(skip_all)]
    pub async fn get_session(&self, model: &str, session: &str) -> Result<Option<SessionRecord>> {
        let keys = self.keys(model, session);
        match self {
            Store::Memory(m) => Ok(m.record(&keys.record)),
            Store::Redis(r) => r.get_record(&keys).await,
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
        let stored = match self {
            Store::Memory(m) => m.commit(&keys, write)?,
            Store::Redis(r) => r.commit(&keys, write).await?,
        };
        match stored {
            Ok(version) => Ok(CommitOutcome::Committed(version)),
            Err(None) => Err(Error::NoSession(record.id.clone())),
            Err(Some(current)) => Ok(CommitOutcome::Superseded(Box::new(current))),
        }
    }

    /// Writes `record` (new prompt tokens, parameters, returned count) if the stored one
    /// is still at `base`: [`Store::commit`] without blobs.
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
        match self {
            Store::Memory(m) => Ok(keys.iter().map(|k| m.bytes(k)).collect()),
            Store::Redis(r) => r.get_blobs(&keys).await,
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
        match self {
            Store::Memory(m) => Ok(m.delete(&keys, doomed, blobs)),
            Store::Redis(r) => {
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
        match self {
            Store::Memory(m) => Ok(m.lease(&key, owner, ttl)),
            Store::Redis(r) => r.lease(&key, owner, ttl).await,
        }
    }

    /// Gives up `owner`'s lease on a session (nothing when another owner holds it).
    #[tracing::instrument(skip_all)]
    pub async fn release(&self, model: &str, session: &str, owner: &str) -> Result<()> {
        let key = self.keys(model, session).lease;
        match self {
            Store::Memory(m) => m.release(&key, owner),
            Store::Redis(r) => r.release(&key, owner).await?,
        }
        Ok(())
    }

    /// Drops every key of the in-memory store, as a Redis `FLUSHALL` or an eviction
    /// would, for tests of what survives that (a Redis store is flushed by its server).
    #[cfg(any(test, feature = "contract"))]
    pub fn flush_memory(&self) {
        if let Store::Memory(m) = self {
            m.map().clear();
        }
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
        match self {
            Store::Memory(m) => Ok(m.claim_slot(&key, session, limit)),
            Store::Redis(r) => r.claim_slot(&key, session, limit).await,
        }
    }

    /// Stops counting `session` among `owner`'s live sessions.
    #[tracing::instrument(skip_all)]
    pub async fn release_slot(&self, model: &str, owner: &str, session: &str) -> Result<()> {
        let key = self.owner_key(model, owner);
        match self {
            Store::Memory(m) => m.release_slot(&key, session),
            Store::Redis(r) => r.release_slot(&key, session).await?,
        }
        Ok(())
    }

    fn owner_key(&self, model: &str, owner: &str) -> String {
        format!("{}:{model}:owner:{owner}", self.config().prefix)
    }

    /// Checks that the store answers.
    pub async fn ping(&self) -> Result<()> {
        match self {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => r.ping().await,
        }
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

/// A stored value.
enum Value {
    Bytes(Vec<u8>),
    Record(SessionRecord),
    /// Sessions counted for an API key, each until its expiry.
    Slots(HashMap<String, Instant>),
}

/// Values by key, each with its expiry.
type Entries = HashMap<String, (Value, Instant)>;

/// The in-memory store: a map with per-key expiry, under one lock (so every operation is
/// atomic, as the Redis scripts are).
#[derive(Clone)]
pub struct MemoryStore {
    config: StoreConfig,
    entries: Arc<Mutex<Entries>>,
    /// Jobs, their queue and the registry (see [`crate::jobs`]).
    pub(crate) jobs: Arc<Mutex<crate::jobs::MemoryJobs>>,
}

/// The live value at `key`.
fn live<'m>(map: &'m Entries, key: &str) -> Option<&'m Value> {
    map.get(key)
        .filter(|(_, expiry)| *expiry > Instant::now())
        .map(|(v, _)| v)
}

impl MemoryStore {
    fn map(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, map: &mut Entries, key: &str, value: Value, ttl: Duration) {
        let now = Instant::now();
        // Expired entries are dropped as writes go by, so memory follows the live set.
        if map.len().is_multiple_of(64) {
            map.retain(|_, (_, expiry)| *expiry > now);
        }
        map.insert(key.to_string(), (value, now + ttl));
    }

    fn bytes(&self, key: &str) -> Option<Vec<u8>> {
        match live(&self.map(), key) {
            Some(Value::Bytes(b)) => Some(b.clone()),
            _ => None,
        }
    }

    fn record(&self, key: &str) -> Option<SessionRecord> {
        match live(&self.map(), key) {
            Some(Value::Record(r)) => Some(r.clone()),
            _ => None,
        }
    }

    fn create(&self, keys: &Keys, record: &SessionRecord, version: u64) -> Result<()> {
        let mut map = self.map();
        if live(&map, &keys.tombstone).is_some() {
            return Err(Error::Deleted(record.id.clone()));
        }
        if live(&map, &keys.record).is_some() {
            return Err(Error::SessionExists(record.id.clone()));
        }
        let mut stored = record.clone();
        stored.version = version;
        self.insert(
            &mut map,
            &keys.record,
            Value::Record(stored),
            self.config.ttl,
        );
        Ok(())
    }

    fn commit(&self, keys: &Keys, write: Write<'_>) -> Result<Written> {
        let mut map = self.map();
        let current = match live(&map, &keys.record) {
            Some(Value::Record(r)) => r.clone(),
            _ => return Ok(Err(None)),
        };
        if current.base() != write.base {
            return Ok(Err(Some(current)));
        }
        let mut next = write.record.clone();
        next.version = current.version + 1;
        let version = next.version;
        let ttl = self.config.ttl;
        for (k, v) in write.blobs {
            self.insert(&mut map, &k, Value::Bytes(v), ttl);
        }
        self.insert(&mut map, &keys.record, Value::Record(next), ttl);
        for k in &write.expired {
            map.remove(k);
        }
        Ok(Ok(version))
    }

    fn delete(
        &self,
        keys: &Keys,
        doomed: Vec<String>,
        blobs: impl Fn(Range<usize>) -> Vec<String>,
    ) -> bool {
        let mut map = self.map();
        let blocks = match live(&map, &keys.record) {
            Some(Value::Record(r)) => Some(r.committed_blocks),
            _ => None,
        };
        for k in doomed.iter().chain(&blobs(0..blocks.unwrap_or(0))) {
            map.remove(k);
        }
        self.insert(
            &mut map,
            &keys.tombstone,
            Value::Bytes(Vec::new()),
            self.config.ttl,
        );
        blocks.is_some()
    }

    fn claim_slot(&self, key: &str, session: &str, limit: usize) -> bool {
        let mut map = self.map();
        let now = Instant::now();
        // Taken out and put back, not copied: a key may count thousands of sessions.
        let mut slots = match map.remove(key) {
            Some((Value::Slots(s), expiry)) if expiry > now => s,
            _ => HashMap::new(),
        };
        slots.retain(|_, expiry| *expiry > now);
        let counted = slots.contains_key(session) || slots.len() < limit;
        if counted {
            slots.insert(session.to_string(), now + self.config.ttl);
        }
        self.insert(&mut map, key, Value::Slots(slots), self.config.ttl);
        counted
    }

    fn release_slot(&self, key: &str, session: &str) {
        let mut map = self.map();
        if let Some((Value::Slots(slots), _)) = map.get_mut(key) {
            slots.remove(session);
        }
    }

    fn lease(&self, key: &str, owner: &str, ttl: Duration) -> bool {
        let mut map = self.map();
        match live(&map, key) {
            Some(Value::Bytes(held)) if held != owner.as_bytes() => false,
            _ => {
                self.insert(&mut map, key, Value::Bytes(owner.as_bytes().to_vec()), ttl);
                true
            }
        }
    }

    fn release(&self, key: &str, owner: &str) {
        let mut map = self.map();
        if matches!(live(&map, key), Some(Value::Bytes(held)) if held == owner.as_bytes()) {
            map.remove(key);
        }
    }
}

/// The Redis store.
#[derive(Clone)]
pub struct RedisStore {
    config: StoreConfig,
    manager: ConnectionManager,
}

/// KV blobs per MGET when reading a session's window (about 1 MB at the tiny shape, 4.7
/// MB at the paper's small one).
const BLOBS_PER_READ: usize = 16;

/// Creates a session: KEYS = record, tokens, tombstone; ARGV = version, meta, tokens,
/// TTL in ms. Returns 'deleted', 'exists' or 'ok'.
const CREATE_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[3]) == 1 then return 'deleted' end
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'meta', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 'ok'
"#;

/// The compare-and-set write. KEYS = record, tokens, then ARGV[6] blob keys, then the
/// expired blob keys; ARGV = version read, token bytes then, meta, appended token bytes,
/// TTL in ms, blob count, the blobs. Returns the new version; when the stored version or
/// token length differs, {version, meta, tokens} as stored; false without a record.
const COMMIT_SCRIPT: &str = r#"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return false end
local tokens = redis.call('GET', KEYS[2]) or ''
if v ~= ARGV[1] or #tokens ~= tonumber(ARGV[2]) then
  return {v, redis.call('HGET', KEYS[1], 'meta'), tokens}
end
local next = tostring(tonumber(v) + 1)
redis.call('APPEND', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[1], 'v', next, 'meta', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local n = tonumber(ARGV[6])
for i = 1, n do redis.call('SET', KEYS[2 + i], ARGV[6 + i], 'PX', ARGV[5]) end
for i = 3 + n, #KEYS do redis.call('UNLINK', KEYS[i]) end
return next
"#;

/// Deletes a session: KEYS = tombstone, then the doomed keys (the record first); ARGV =
/// TTL in ms. Returns the metadata of the record deleted, false when there was none.
const DELETE_SCRIPT: &str = r#"
local meta = redis.call('HGET', KEYS[2], 'meta')
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
for i = 2, #KEYS do redis.call('UNLINK', KEYS[i]) end
return meta
"#;

/// Takes or renews a lease: KEYS = lease; ARGV = owner, TTL in ms. Returns 1 when the
/// owner holds it now.
const LEASE_SCRIPT: &str = r#"
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#;

/// Counts a session for an API key: KEYS = the key's sorted set (session -> expiry, ms of
/// the server's clock); ARGV = session, TTL in ms, limit. Returns 1 when counted.
const CLAIM_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Gives a lease up: KEYS = lease; ARGV = owner.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// A reply of a script that is not what the script returns.
fn corrupt(e: redis::ParsingError) -> Error {
    Error::Corrupt(format!("store reply: {e}"))
}

static CREATE: LazyLock<Script> = LazyLock::new(|| Script::new(CREATE_SCRIPT));
static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(COMMIT_SCRIPT));
static DELETE: LazyLock<Script> = LazyLock::new(|| Script::new(DELETE_SCRIPT));
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(LEASE_SCRIPT));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_SCRIPT));
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(CLAIM_SCRIPT));

impl RedisStore {
    fn ttl_ms(&self) -> u64 {
        self.config.ttl.as_millis() as u64
    }

    async fn create(&self, keys: &Keys, record: &SessionRecord, version: u64) -> Result<()> {
        let (meta, tokens) = (record.meta_bytes(), encode_tokens(&record.tokens));
        let reply: String = self
            .retried("create", |mut con| {
                let (meta, tokens) = (&meta, &tokens);
                async move {
                    CREATE
                        .key(&keys.record)
                        .key(&keys.tokens)
                        .key(&keys.tombstone)
                        .arg(version)
                        .arg(meta)
                        .arg(tokens)
                        .arg(self.ttl_ms())
                        .invoke_async(&mut con)
                        .await
                }
            })
            .await?;
        match reply.as_str() {
            "ok" => Ok(()),
            "deleted" => Err(Error::Deleted(record.id.clone())),
            _ => Err(Error::SessionExists(record.id.clone())),
        }
    }

    async fn get_record(&self, keys: &Keys) -> Result<Option<SessionRecord>> {
        type Parts = (Option<u64>, Option<Vec<u8>>);
        let read = redis::pipe()
            .atomic()
            .cmd("HMGET")
            .arg(&keys.record)
            .arg("v")
            .arg("meta")
            .cmd("GET")
            .arg(&keys.tokens)
            .clone();
        let ((version, meta), tokens): (Parts, Option<Vec<u8>>) = self
            .retried("get_session", |mut con| {
                let read = &read;
                async move { read.query_async(&mut con).await }
            })
            .await?;
        match (version, meta) {
            (Some(v), Some(meta)) => {
                let tokens = tokens.unwrap_or_default();
                SessionRecord::from_parts(&meta, &tokens, v).map(Some)
            }
            (None, None) => Ok(None),
            _ => Err(Error::Corrupt(
                "session record without a version or metadata".into(),
            )),
        }
    }

    async fn commit(&self, keys: &Keys, write: Write<'_>) -> Result<Written> {
        let record = write.record;
        let mut script = COMMIT.prepare_invoke();
        script.key(&keys.record).key(&keys.tokens);
        for (k, _) in &write.blobs {
            script.key(k);
        }
        script
            .key(&write.expired)
            .arg(write.base.version)
            .arg(write.base.tokens * 4)
            .arg(record.meta_bytes())
            .arg(encode_tokens(&record.tokens[write.base.tokens..]))
            .arg(self.ttl_ms())
            .arg(write.blobs.len());
        for (_, v) in &write.blobs {
            script.arg(v.as_slice());
        }
        let reply: redis::Value = self
            .retried("commit", |mut con| {
                let script = &script;
                async move { script.invoke_async(&mut con).await }
            })
            .await?;
        match reply {
            redis::Value::Nil => Ok(Err(None)),
            redis::Value::Array(parts) => {
                let (version, meta, tokens): (u64, Vec<u8>, Vec<u8>) =
                    redis::from_redis_value(redis::Value::Array(parts)).map_err(corrupt)?;
                Ok(Err(Some(SessionRecord::from_parts(
                    &meta, &tokens, version,
                )?)))
            }
            other => Ok(Ok(redis::from_redis_value(other).map_err(corrupt)?)),
        }
    }

    /// Runs the delete script: the record deleted, `None` when there was none.
    async fn delete(&self, tombstone: &str, doomed: &[String]) -> Result<Option<SessionRecord>> {
        let meta: Option<Vec<u8>> = self
            .retried("delete", |mut con| async move {
                DELETE
                    .key(tombstone)
                    .key(doomed)
                    .arg(self.ttl_ms())
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        meta.map(|m| SessionRecord::from_meta(&m)).transpose()
    }

    /// Deletes `keys` (nothing when there are none).
    async fn unlink(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .retried("unlink", |mut con| async move { con.unlink(keys).await })
            .await?;
        Ok(())
    }

    async fn lease(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let held: i64 = self
            .retried("lease", |mut con| async move {
                LEASE
                    .key(key)
                    .arg(owner)
                    .arg(ttl.as_millis() as u64)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        Ok(held == 1)
    }

    async fn release(&self, key: &str, owner: &str) -> Result<()> {
        let _: i64 = self
            .retried("release", |mut con| async move {
                RELEASE.key(key).arg(owner).invoke_async(&mut con).await
            })
            .await?;
        Ok(())
    }

    async fn claim_slot(&self, key: &str, session: &str, limit: usize) -> Result<bool> {
        let counted: i64 = self
            .retried("claim_slot", |mut con| async move {
                CLAIM
                    .key(key)
                    .arg(session)
                    .arg(self.ttl_ms())
                    .arg(limit)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        Ok(counted == 1)
    }

    async fn release_slot(&self, key: &str, session: &str) -> Result<()> {
        let _: i64 = self
            .retried("release_slot", |mut con| async move {
                con.zrem(key, session).await
            })
            .await?;
        Ok(())
    }

    /// Reads blobs in MGETs of [`BLOBS_PER_READ`] keys, all sent at once: the server
    /// then builds a few small replies in turn instead of one of the whole window (16.7
    /// MB at the tiny shape's 1,024 tokens, which it allocated afresh for every read), and
    /// the first replies are on their way while it builds the next: 10.5-15 against
    /// 7.4-11.4 ms (median of 25) for that window on a local server. The window is one
    /// operation: retried and measured as a whole.
    async fn get_blobs(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        let parts = self
            .retried("get_blobs", |con| {
                let reads = keys.chunks(BLOBS_PER_READ).map(move |keys| {
                    let mut con = con.clone();
                    async move { con.mget::<_, Vec<Option<Vec<u8>>>>(keys).await }
                });
                futures::future::try_join_all(reads)
            })
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }

    async fn ping(&self) -> Result<()> {
        let _: String = self
            .retried("ping", |mut con| async move {
                redis::cmd("PING").query_async(&mut con).await
            })
            .await?;
        Ok(())
    }

    /// Runs `call` on the shared connection, and again (twice at most, after 50 then
    /// 200 ms) when the connection broke: after a Redis restart the first command on
    /// the old connection fails while the manager reconnects. Every call here may run
    /// twice: reads, and scripts that compare before they write (a repeated commit finds
    /// its own write as the stored record: [`Store::commit`]'s callers treat that as
    /// committed by another writer, with the same tokens).
    pub(crate) async fn retried<T, F, Fut>(
        &self,
        op: &'static str,
        call: F,
    ) -> redis::RedisResult<T>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        let mut attempt = 0;
        loop {
            match call(self.manager.clone()).await {
                Err(e) if attempt < 2 && broken_connection(&e) => {
                    tracing::info!(error = %e, "Redis connection broke; trying again");
                    metrics::retried(op);
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                    attempt += 1;
                }
                other => {
                    metrics::operation(op, started, other.is_ok());
                    return other;
                }
            }
        }
    }
}

/// Whether `e` is a lost or refused connection, rather than an answer.
fn broken_connection(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::record;

    #[tokio::test]
    async fn memory_store_keeps_the_contract() {
        crate::contract::check(Store::memory(StoreConfig::default())).await;
        crate::contract::check_jobs(Store::memory(StoreConfig::default())).await;
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
