//! The training service's durable state: job records, the job queue, and the model
//! registry's version records. Bodies are opaque bytes (the training service's JSON);
//! the store keeps them, their revisions and the queue's claims.
//!
//! In Redis, jobs live under `{prefix}:{jobs}:` (one Cluster slot: a submit writes the
//! record, the index and the queue in one script): `job:{id}` (a hash of the revision and
//! the body), `index` (a sorted set by submission time) and `queue` (a stream with the
//! consumer group `trainers`). A trainer claims an entry with `XREADGROUP`, keeps it by
//! touching it (`XCLAIM ... JUSTID`, only while it still owns it) and acknowledges it
//! when the job ends; an entry whose trainer stopped touching it for the lease is taken
//! by the next claim (`XAUTOCLAIM`), its delivery count telling how many trainers had it.
//! The registry lives under `{prefix}:{registry}:`: `names` (a set), `{name}:next` (the
//! last version number handed out) and `{name}` (a hash of version to body, each field
//! written once). Nothing here expires.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::{AsyncCommands, Script};

use crate::store::{MemoryStore, RedisStore};
use crate::{Error, Result, Store};

/// A job taken from the queue by one trainer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobClaim {
    /// The job's id.
    pub job_id: String,
    /// The queue entry: what is touched and acknowledged.
    pub entry: String,
    /// Trainers that have taken this entry, this one included: more than one means the
    /// earlier ones stopped (died, or hung past the lease).
    pub deliveries: u64,
}

/// A stored body and its revision (1 for a new record; each write adds one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revised {
    /// The revision read.
    pub revision: u64,
    /// The bytes stored.
    pub body: Vec<u8>,
}

/// The consumer group of the trainers.
const GROUP: &str = "trainers";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The keys of the jobs and the registry.
struct JobKeys {
    base: String,
    registry: String,
}

impl JobKeys {
    fn job(&self, id: &str) -> String {
        format!("{}job:{id}", self.base)
    }
    fn index(&self) -> String {
        format!("{}index", self.base)
    }
    fn queue(&self) -> String {
        format!("{}queue", self.base)
    }
    fn names(&self) -> String {
        format!("{}names", self.registry)
    }
    fn next_version(&self, name: &str) -> String {
        format!("{}{name}:next", self.registry)
    }
    fn versions(&self, name: &str) -> String {
        format!("{}{name}", self.registry)
    }
}

impl Store {
    fn job_keys(&self) -> JobKeys {
        let prefix = &self.config().prefix;
        JobKeys {
            base: format!("{prefix}:{{jobs}}:"),
            registry: format!("{prefix}:{{registry}}:"),
        }
    }

    /// Stores a new job record (revision 1) and queues the job; false, changing nothing,
    /// when the id exists.
    #[tracing::instrument(skip_all)]
    pub async fn submit_job(&self, id: &str, body: &[u8]) -> Result<bool> {
        let keys = self.job_keys();
        match self {
            Store::Memory(m) => Ok(m.jobs().submit(id, body)),
            Store::Redis(r) => r.submit_job(&keys, id, body).await,
        }
    }

    /// Reads a job record.
    pub async fn get_job(&self, id: &str) -> Result<Option<Revised>> {
        let key = self.job_keys().job(id);
        match self {
            Store::Memory(m) => Ok(m.jobs().records.get(id).cloned()),
            Store::Redis(r) => r.get_revised(&key).await,
        }
    }

    /// The most recently submitted `limit` job records, newest first.
    pub async fn list_jobs(&self, limit: usize) -> Result<Vec<Revised>> {
        let keys = self.job_keys();
        match self {
            Store::Memory(m) => {
                let jobs = m.jobs();
                let newest = jobs.order.iter().rev().take(limit);
                Ok(newest
                    .filter_map(|id| jobs.records.get(id).cloned())
                    .collect())
            }
            Store::Redis(r) => r.list_jobs(&keys, limit).await,
        }
    }

    /// Writes a job record if it is still at `revision`: the new revision, or `None` when
    /// another writer moved it (read it again) or it does not exist.
    pub async fn update_job(&self, id: &str, revision: u64, body: &[u8]) -> Result<Option<u64>> {
        let key = self.job_keys().job(id);
        match self {
            Store::Memory(m) => Ok(m.jobs().update(id, revision, body)),
            Store::Redis(r) => r.update_job(&key, revision, body).await,
        }
    }

    /// Takes the next job for `trainer`: an entry another trainer stopped touching for
    /// `lease` first, else the oldest never taken; `None` when there is none.
    #[tracing::instrument(skip(self))]
    pub async fn claim_job(&self, trainer: &str, lease: Duration) -> Result<Option<JobClaim>> {
        let queue = self.job_keys().queue();
        match self {
            Store::Memory(m) => Ok(m.jobs().claim(trainer, lease)),
            Store::Redis(r) => r.claim_job(&queue, trainer, lease).await,
        }
    }

    /// Renews `trainer`'s hold on `claim`: false when another trainer has taken the entry
    /// since (the caller must stop working on the job at once).
    pub async fn touch_job(&self, claim: &JobClaim, trainer: &str) -> Result<bool> {
        let queue = self.job_keys().queue();
        match self {
            Store::Memory(m) => Ok(m.jobs().touch(&claim.entry, trainer)),
            Store::Redis(r) => r.touch_job(&queue, &claim.entry, trainer).await,
        }
    }

    /// Removes a claimed entry from the queue: its job has ended.
    pub async fn finish_job(&self, claim: &JobClaim) -> Result<()> {
        let queue = self.job_keys().queue();
        match self {
            Store::Memory(m) => {
                m.jobs().pending.remove(&claim.entry);
                Ok(())
            }
            Store::Redis(r) => r.finish_job(&queue, &claim.entry).await,
        }
    }

    /// Hands out the next version number of model `name` (1 for its first); numbers are
    /// never handed out twice, even when a publication that took one never completes.
    pub async fn next_model_version(&self, name: &str) -> Result<u64> {
        let keys = self.job_keys();
        match self {
            Store::Memory(m) => {
                let mut jobs = m.jobs();
                let next = jobs.next_versions.entry(name.to_string()).or_insert(0);
                *next += 1;
                Ok(*next)
            }
            Store::Redis(r) => r.next_version(&keys.next_version(name)).await,
        }
    }

    /// Records version `version` of model `name`; false, changing nothing, when that
    /// version is recorded already (versions are immutable).
    pub async fn record_model_version(
        &self,
        name: &str,
        version: u64,
        body: &[u8],
    ) -> Result<bool> {
        let keys = self.job_keys();
        match self {
            Store::Memory(m) => {
                let mut jobs = m.jobs();
                let versions = jobs.versions.entry(name.to_string()).or_default();
                if versions.contains_key(&version) {
                    return Ok(false);
                }
                versions.insert(version, body.to_vec());
                Ok(true)
            }
            Store::Redis(r) => r.record_version(&keys, name, version, body).await,
        }
    }

    /// The recorded versions of model `name`, oldest first (none for an unknown name).
    pub async fn model_versions(&self, name: &str) -> Result<Vec<(u64, Vec<u8>)>> {
        let key = self.job_keys().versions(name);
        match self {
            Store::Memory(m) => Ok(m.jobs().versions.get(name).map_or(Vec::new(), |v| {
                v.iter().map(|(k, b)| (*k, b.clone())).collect()
            })),
            Store::Redis(r) => r.versions(&key).await,
        }
    }

    /// The names of the models with a recorded version, sorted.
    pub async fn model_names(&self) -> Result<Vec<String>> {
        let key = self.job_keys().names();
        match self {
            Store::Memory(m) => Ok(m.jobs().versions.keys().cloned().collect()),
            Store::Redis(r) => {
                let mut names: Vec<String> = r
                    .retried("model_names", |mut con| {
                        let key = &key;
                        async move { con.smembers(key).await }
                    })
                    .await?;
                names.sort();
                Ok(names)
            }
        }
    }
}

/// A queue entry taken by a trainer.
struct Pending {
    job: String,
    trainer: String,
    touched: Instant,
    deliveries: u64,
}

/// The in-memory jobs, queue and registry.
#[derive(Default)]
pub(crate) struct MemoryJobs {
    records: HashMap<String, Revised>,
    /// Job ids in submission order.
    order: Vec<String>,
    /// Entries never taken, oldest first.
    queue: VecDeque<(String, String)>,
    /// Taken entries, by entry id.
    pending: BTreeMap<String, Pending>,
    entries: u64,
    next_versions: HashMap<String, u64>,
    versions: BTreeMap<String, BTreeMap<u64, Vec<u8>>>,
}

impl MemoryJobs {
    fn submit(&mut self, id: &str, body: &[u8]) -> bool {
        if self.records.contains_key(id) {
            return false;
        }
        let record = Revised {
            revision: 1,
            body: body.to_vec(),
        };
        self.records.insert(id.to_string(), record);
        self.order.push(id.to_string());
        self.entries += 1;
        // Zero-padded, so the pending map orders entries as they were queued.
        let entry = format!("{:020}-0", self.entries);
        self.queue.push_back((entry, id.to_string()));
        true
    }

    fn update(&mut self, id: &str, revision: u64, body: &[u8]) -> Option<u64> {
        let record = self
            .records
            .get_mut(id)
            .filter(|r| r.revision == revision)?;
        record.revision += 1;
        record.body = body.to_vec();
        Some(record.revision)
    }

    fn claim(&mut self, trainer: &str, lease: Duration) -> Option<JobClaim> {
        let now = Instant::now();
        let lapsed = self
            .pending
            .iter_mut()
            .find(|(_, p)| now.duration_since(p.touched) >= lease);
        if let Some((entry, p)) = lapsed {
            p.trainer = trainer.to_string();
            p.touched = now;
            p.deliveries += 1;
            return Some(JobClaim {
                job_id: p.job.clone(),
                entry: entry.clone(),
                deliveries: p.deliveries,
            });
        }
        let (entry, job) = self.queue.pop_front()?;
        let pending = Pending {
            job: job.clone(),
            trainer: trainer.to_string(),
            touched: now,
            deliveries: 1,
        };
        self.pending.insert(entry.clone(), pending);
        Some(JobClaim {
            job_id: job,
            entry,
            deliveries: 1,
        })
    }

    fn touch(&mut self, entry: &str, trainer: &str) -> bool {
        match self.pending.get_mut(entry) {
            Some(p) if p.trainer == trainer => {
                p.touched = Instant::now();
                true
            }
            _ => false,
        }
    }
}

impl MemoryStore {
    fn jobs(&self) -> std::sync::MutexGuard<'_, MemoryJobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stores a job and queues it: KEYS = job, index, queue; ARGV = id, body, time in ms.
/// Returns 1, or 0 when the job exists.
const SUBMIT_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'rev', 1, 'body', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return 1
"#;

/// Writes a job if it is at the revision read: KEYS = job; ARGV = revision, body.
/// Returns the new revision, or false.
const UPDATE_SCRIPT: &str = r#"
local rev = redis.call('HGET', KEYS[1], 'rev')
if not rev or rev ~= ARGV[1] then return false end
local next = tonumber(rev) + 1
redis.call('HSET', KEYS[1], 'rev', next, 'body', ARGV[2])
return next
"#;

/// Takes an entry: KEYS = queue; ARGV = group, trainer, lease in ms. A lapsed entry
/// first, else a new one. Returns {entry, job, deliveries}, or false.
const CLAIM_SCRIPT: &str = r#"
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', 1)
local entries = claimed[2]
if #entries == 0 then
  local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if not read then return false end
  entries = read[1][2]
end
local entry = entries[1]
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
return {entry[1], entry[2][2], pending[1][4]}
"#;

/// Touches an entry if `trainer` holds it: KEYS = queue; ARGV = group, trainer, entry.
/// Returns 1 when held.
const TOUCH_SCRIPT: &str = r#"
local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #held == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"#;

/// Records a model version once: KEYS = names, versions; ARGV = name, version, body.
const VERSION_SCRIPT: &str = r#"
if redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3]) == 0 then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"#;

impl RedisStore {
    async fn submit_job(&self, keys: &JobKeys, id: &str, body: &[u8]) -> Result<bool> {
        self.ensure_group(&keys.queue()).await?;
        let script = Script::new(SUBMIT_SCRIPT);
        let (job, index, queue) = (keys.job(id), keys.index(), keys.queue());
        let stored: i64 = self
            .retried("submit_job", |mut con| {
                let mut call = script.key(&job);
                call.key(&index).key(&queue).arg(id).arg(body).arg(now_ms());
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(stored == 1)
    }

    /// Creates the trainers' group (and the stream) unless it exists.
    async fn ensure_group(&self, queue: &str) -> Result<()> {
        let created: redis::RedisResult<()> = self
            .retried("create_group", |mut con| async move {
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(queue)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut con)
                    .await
            })
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    async fn get_revised(&self, key: &str) -> Result<Option<Revised>> {
        let (revision, body): (Option<u64>, Option<Vec<u8>>) = self
            .retried("get_job", |mut con| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg("rev")
                    .arg("body")
                    .query_async(&mut con)
                    .await
            })
            .await?;
        Ok(revision
            .zip(body)
            .map(|(revision, body)| Revised { revision, body }))
    }

    async fn list_jobs(&self, keys: &JobKeys, limit: usize) -> Result<Vec<Revised>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let index = keys.index();
        let ids: Vec<String> = self
            .retried("list_jobs", |mut con| {
                let index = &index;
                async move { con.zrevrange(index, 0, limit as isize - 1).await }
            })
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for all of them.
        let mut read = redis::pipe();
        for id in &ids {
            read.cmd("HMGET").arg(keys.job(id)).arg("rev").arg("body");
        }
        type Parts = (Option<u64>, Option<Vec<u8>>);
        let parts: Vec<Parts> = self
            .retried("list_jobs", |mut con| {
                let read = &read;
                async move { read.query_async(&mut con).await }
            })
            .await?;
        Ok(parts
            .into_iter()
            .filter_map(|(revision, body)| {
                Some(Revised {
                    revision: revision?,
                    body: body?,
                })
            })
            .collect())
    }

    async fn update_job(&self, key: &str, revision: u64, body: &[u8]) -> Result<Option<u64>> {
        let script = Script::new(UPDATE_SCRIPT);
        self.retried("update_job", |mut con| {
            let mut call = script.key(key);
            call.arg(revision).arg(body);
            async move { call.invoke_async(&mut con).await }
        })
        .await
        .map_err(Error::from)
    }

    async fn claim_job(
        &self,
        queue: &str,
        trainer: &str,
        lease: Duration,
    ) -> Result<Option<JobClaim>> {
        self.ensure_group(queue).await?;
        let script = Script::new(CLAIM_SCRIPT);
        let claimed: Option<(String, String, u64)> = self
            .retried("claim_job", |mut con| {
                let mut call = script.key(queue);
                call.arg(GROUP).arg(trainer).arg(lease.as_millis() as u64);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(claimed.map(|(entry, job_id, deliveries)| JobClaim {
            job_id,
            entry,
            deliveries,
        }))
    }

    async fn touch_job(&self, queue: &str, entry: &str, trainer: &str) -> Result<bool> {
        let script = Script::new(TOUCH_SCRIPT);
        let held: i64 = self
            .retried("touch_job", |mut con| {
                let mut call = script.key(queue);
                call.arg(GROUP).arg(trainer).arg(entry);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(held == 1)
    }

    async fn finish_job(&self, queue: &str, entry: &str) -> Result<()> {
        let finish = redis::pipe()
            .atomic()
            .cmd("XACK")
            .arg(queue)
            .arg(GROUP)
            .arg(entry)
            .cmd("XDEL")
            .arg(queue)
            .arg(entry)
            .clone();
        let _: (i64, i64) = self
            .retried("finish_job", |mut con| {
                let finish = &finish;
                async move { finish.query_async(&mut con).await }
            })
            .await?;
        Ok(())
    }

    async fn next_version(&self, key: &str) -> Result<u64> {
        Ok(self
            .retried(
                "next_version",
                |mut con| async move { con.incr(key, 1).await },
            )
            .await?)
    }

    async fn record_version(
        &self,
        keys: &JobKeys,
        name: &str,
        version: u64,
        body: &[u8],
    ) -> Result<bool> {
        let script = Script::new(VERSION_SCRIPT);
        let (names, versions) = (keys.names(), keys.versions(name));
        let recorded: i64 = self
            .retried("record_version", |mut con| {
                let mut call = script.key(&names);
                call.key(&versions).arg(name).arg(version).arg(body);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(recorded == 1)
    }

    async fn versions(&self, key: &str) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut all: Vec<(u64, Vec<u8>)> = self
            .retried(
                "model_versions",
                |mut con| async move { con.hgetall(key).await },
            )
            .await?;
        all.sort_by_key(|(v, _)| *v);
        Ok(all)
    }
}
