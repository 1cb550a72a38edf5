//! The session store in Redis: each write one server-side script (in `scripts/`) over
//! the keys of one session, which share a Cluster slot.
//!
//! What cannot be rebuilt (tombstones, leases, per-key session counts) carries no Redis
//! TTL, so that no `maxmemory-policy` evicts it: each holds its own expiry, and
//! tombstones and leases are indexed by it in one sorted set, the janitor's, which
//! [`RedisSessions::sweep`] walks to delete the expired ones.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, Script};

use super::{Keys, Write, Written};
use crate::connection::corrupt;
use crate::record::encode_tokens;
use crate::{Error, RedisConnection, Result, SessionRecord, StoreConfig, SyncReplicas, now_ms};

/// KV blobs per MGET when reading a session's window (about 1 MB at the tiny shape, 4.7
/// MB at the paper's small one).
const BLOBS_PER_READ: usize = 16;

static CREATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/create.lua")));
static COMMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/commit.lua")));
static DELETE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/delete.lua")));
static LEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/lease.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/release.lua")));
static READ: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/read.lua")));
static CLAIM_SLOT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/claim_slot.lua")));
static SWEEP: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/sweep.lua")));
static PREFIX_HELD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/prefix_held.lua")));
static PREFIX_PUT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/prefix_put.lua")));
static FORGET: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/forget.lua")));

/// Keys the janitor looks at per round trip.
const SWEEP_BATCH: usize = 256;

/// The sessions in Redis.
#[derive(Clone)]
pub(super) struct RedisSessions {
    pub(super) redis: RedisConnection,
    ttl: Duration,
    sync: Option<SyncReplicas>,
    /// The janitor's index: tombstones and leases, scored by when they expire (ms of
    /// this process's clock: only when to look; each key holds its own expiry).
    janitor: String,
}

impl RedisSessions {
    pub(super) fn new(redis: RedisConnection, config: &StoreConfig) -> Self {
        Self {
            redis,
            ttl: config.ttl,
            sync: config.sync_replicas,
            janitor: format!("{}:janitor", config.prefix),
        }
    }

    /// Waits for the replicas of `key`'s master to have the write just made, when the
    /// deployment asks for synchronous replication. A shortfall is counted, not an
    /// error: the write stands on the master, as it would without the wait.
    async fn replicated(&self, key: &str) -> Result<()> {
        let Some(sync) = self.sync else {
            return Ok(());
        };
        let acked = self
            .redis
            .wait_for_replicas(key, sync.replicas, sync.timeout)
            .await?;
        if acked < sync.replicas {
            tracing::debug!(acked, "fewer replicas than asked have the session write");
            crate::metrics::replication_shortfall();
        }
        Ok(())
    }

    fn ttl_ms(&self) -> u64 {
        self.ttl.as_millis() as u64
    }

    pub(super) async fn ping(&self) -> Result<()> {
        self.redis.ping().await
    }

    pub(super) async fn create(
        &self,
        keys: &Keys,
        record: &SessionRecord,
        version: u64,
    ) -> Result<()> {
        let (meta, tokens) = (record.meta_bytes(), encode_tokens(&record.tokens));
        let reply: String = self
            .redis
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
            "ok" => self.replicated(&keys.record).await,
            "deleted" => Err(Error::Deleted(record.id.clone())),
            _ => Err(Error::SessionExists(record.id.clone())),
        }
    }

    pub(super) async fn get_record(&self, keys: &Keys) -> Result<Option<SessionRecord>> {
        type Parts = (Option<u64>, Option<Vec<u8>>);
        let ((version, meta), tokens): (Parts, Option<Vec<u8>>) = self
            .redis
            .retried("get_session", |mut con| {
                let mut read = READ.prepare_invoke();
                read.key(&keys.record).key(&keys.tokens);
                async move { read.invoke_async(&mut con).await }
            })
            .await?;
        match (version, meta, tokens) {
            (Some(v), Some(meta), Some(tokens)) => {
                SessionRecord::from_parts(&meta, &tokens, v).map(Some)
            }
            // Every session has a prompt: a record without tokens lost them to eviction
            // (whose policy takes keys one by one). The session is gone as a whole, to
            // be restored by a generation holding its tokens, else NOT_FOUND.
            (Some(_), Some(_), None) => {
                tracing::warn!("a session record without its tokens (evicted); treated as gone");
                Ok(None)
            }
            (None, None, _) => Ok(None),
            _ => Err(Error::Corrupt(
                "session record without a version or metadata".into(),
            )),
        }
    }

    pub(super) async fn commit(&self, keys: &Keys, write: Write<'_>) -> Result<Written> {
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
            .redis
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
            other => {
                let version = redis::from_redis_value(other).map_err(corrupt)?;
                self.replicated(&keys.record).await?;
                Ok(Ok(version))
            }
        }
    }

    /// Runs the delete script: the record deleted, `None` when there was none.
    pub(super) async fn delete(
        &self,
        tombstone: &str,
        doomed: &[String],
    ) -> Result<Option<SessionRecord>> {
        let meta: Option<Vec<u8>> = self
            .redis
            .retried("delete", |mut con| async move {
                DELETE
                    .key(tombstone)
                    .key(doomed)
                    .arg(self.ttl_ms())
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        self.index(tombstone, self.ttl).await?;
        self.replicated(tombstone).await?;
        meta.map(|m| SessionRecord::from_meta(&m)).transpose()
    }

    /// Puts `key` in the janitor's index, to be looked at once `ttl` has passed. A key
    /// written but not indexed (this call failing) is only deleted with its session.
    async fn index(&self, key: &str, ttl: Duration) -> Result<()> {
        let at = now_ms() + ttl.as_millis() as u64;
        let _: i64 = self
            .redis
            .retried("janitor_index", |mut con| async move {
                con.zadd(&self.janitor, key, at).await
            })
            .await?;
        Ok(())
    }

    /// Deletes the expired tombstones and leases; how many.
    pub(super) async fn sweep(&self) -> Result<usize> {
        let mut deleted = 0;
        loop {
            let looked = now_ms();
            let due: Vec<String> = self
                .redis
                .retried("janitor_due", |mut con| async move {
                    con.zrangebyscore_limit(&self.janitor, 0, looked, 0, SWEEP_BATCH as isize)
                        .await
                })
                .await?;
            let mut gone = Vec::new();
            for key in &due {
                let left: u64 = self
                    .redis
                    .retried("janitor_sweep", |mut con| async move {
                        SWEEP.key(key).invoke_async(&mut con).await
                    })
                    .await?;
                match left {
                    0 => gone.push(key),
                    left => self.index(key, Duration::from_millis(left)).await?,
                }
            }
            deleted += gone.len();
            if !gone.is_empty() {
                let _: i64 = self
                    .redis
                    .retried("janitor_forget", |mut con| {
                        let mut forget = FORGET.prepare_invoke();
                        forget.key(&self.janitor).arg(looked).arg(&gone);
                        async move { forget.invoke_async(&mut con).await }
                    })
                    .await?;
            }
            if due.len() < SWEEP_BATCH {
                return Ok(deleted);
            }
        }
    }

    /// Deletes `keys` (nothing when there are none).
    pub(super) async fn unlink(&self, keys: &[String]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let _: i64 = self
            .redis
            .retried("unlink", |mut con| async move { con.unlink(keys).await })
            .await?;
        Ok(())
    }

    pub(super) async fn lease(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
        let state: i64 = self
            .redis
            .retried("lease", |mut con| async move {
                LEASE
                    .key(key)
                    .arg(owner)
                    .arg(ttl.as_millis() as u64)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        if state == 2 {
            self.index(key, ttl).await?;
        }
        Ok(state != 0)
    }

    pub(super) async fn release(&self, key: &str, owner: &str) -> Result<()> {
        let _: i64 = self
            .redis
            .retried("release", |mut con| async move {
                RELEASE.key(key).arg(owner).invoke_async(&mut con).await
            })
            .await?;
        Ok(())
    }

    pub(super) async fn claim_slot(&self, key: &str, session: &str, limit: usize) -> Result<bool> {
        let counted: i64 = self
            .redis
            .retried("claim_slot", |mut con| async move {
                CLAIM_SLOT
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

    pub(super) async fn release_slot(&self, key: &str, session: &str) -> Result<()> {
        let _: i64 = self
            .redis
            .retried("release_slot", |mut con| async move {
                con.zrem(key, session).await
            })
            .await?;
        Ok(())
    }

    /// Whether each of `keys` (of one slot) holds a value, in one script.
    pub(super) async fn held(&self, keys: &[String]) -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let held: Vec<i64> = self
            .redis
            .retried("held_prefix", |mut con| {
                let mut probe = PREFIX_HELD.prepare_invoke();
                for key in keys {
                    probe.key(key);
                }
                async move { probe.invoke_async(&mut con).await }
            })
            .await?;
        Ok(held.into_iter().map(|h| h == 1).collect())
    }

    /// Writes (key, blob) pairs of one slot with the TTL, [`BLOBS_PER_READ`] per script
    /// call, all sent at once (as [`RedisSessions::get_blobs`] reads them).
    pub(super) async fn put_prefix(&self, blobs: Vec<(String, Vec<u8>)>) -> Result<()> {
        let blobs = &blobs;
        self.redis
            .retried("put_prefix", |con| {
                let writes = blobs.chunks(BLOBS_PER_READ).map(move |chunk| {
                    let mut con = con.clone();
                    let mut put = PREFIX_PUT.prepare_invoke();
                    put.arg(self.ttl_ms());
                    for (key, blob) in chunk {
                        put.key(key).arg(blob.as_slice());
                    }
                    async move { put.invoke_async::<i64>(&mut con).await }
                });
                futures::future::try_join_all(writes)
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
    pub(super) async fn get_blobs(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        let parts = self
            .redis
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
}
