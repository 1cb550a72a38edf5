//! The job store: the training service's durable state, that is job records, the job
//! queue, and the model registry's version records. Bodies are opaque bytes (the training
//! service's JSON); the store keeps them, their revisions and the queue's claims.
//!
//! In Redis, jobs live under `{prefix}:{jobs}:` (one Cluster slot: a submit writes the
//! record, the index and the queue in one script): `job:{id}` (a hash of the revision and
//! the body), `index` (a sorted set by submission time) and `queue` (a stream with the
//! consumer group `trainers`). A trainer claims an entry with `XREADGROUP`, keeps it by
//! touching it (`XCLAIM ... JUSTID`, only while it still owns it) and acknowledges it
//! when the job ends; `open:{owner}` (a set) holds the ids of an API key's queued and
//! running jobs, counted at submission; `changes` (a stream capped near 1,000 entries) names each job
//! whose record was updated or deleted, for watchers to block on; an entry whose trainer stopped touching it for the lease is taken
//! by the next claim (`XAUTOCLAIM`), its delivery count telling how many trainers had it.
//! The registry lives under `{prefix}:{registry}:`: `names` (a set), `owners` (a hash of
//! name to API key id), `{name}:next` (the last version number handed out), `{name}` (a
//! hash of version to body, each field written once and deleted when the version is
//! retired), `{name}:pins` (a set of pinned versions) and `retired` (a set of
//! `name/version` whose files still await removal). Nothing here expires.

mod memory;
mod redis;

use std::time::Duration;

use crate::{RedisConnection, Result, StoreConfig};

use self::memory::MemoryJobs;
use self::redis::RedisJobs;

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

/// The limit a submission is held to: its owner's open (queued or running) jobs.
#[derive(Debug, Clone, Copy)]
pub struct Quota<'a> {
    /// The owner (an API key's id).
    pub owner: &'a str,
    /// Most jobs it may have open; 0: no limit (the jobs are counted all the same).
    pub limit: usize,
}

/// What a submission did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Stored and queued; the owner's open jobs now (0 without a quota).
    Queued {
        /// Open jobs of the owner, this one included.
        open: usize,
    },
    /// A job of that id exists: nothing changed.
    Exists,
    /// The owner has its limit of jobs open: nothing changed.
    OverQuota {
        /// Open jobs of the owner.
        open: usize,
    },
}

/// A place in the sequence of job-record changes (see [`JobStore::job_changes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeCursor(String);

/// A stored body and its revision (1 for a new record; each write adds one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revised {
    /// The revision read.
    pub revision: u64,
    /// The bytes stored.
    pub body: Vec<u8>,
}

/// The store of jobs, their queue and the registry's records. Cloning is cheap and
/// shares the store.
#[derive(Clone)]
pub struct JobStore {
    keys: JobKeys,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Memory(MemoryJobs),
    Redis(RedisJobs),
}

/// Model names the registry's own keys take (`{prefix}:{registry}:names` is the set of
/// names, `owners` the hash of their owners and `retired` the versions whose files await
/// removal, beside each name's `{prefix}:{registry}:{name}`): a model may not be called
/// so. Names hold no `:`, so `{name}:next` and `{name}:pins` meet no other name.
pub const RESERVED_MODEL_NAMES: [&str; 3] = ["names", "owners", "retired"];

/// What retiring a model version did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retirement {
    /// Retired: its record (returned) is gone and its files await removal.
    Retired(Vec<u8>),
    /// No such version is recorded.
    NotFound,
    /// The version is pinned: nothing changed.
    Pinned,
}

/// The keys of the jobs and the registry.
#[derive(Clone)]
struct JobKeys {
    base: String,
    registry: String,
}

impl JobKeys {
    fn new(prefix: &str) -> Self {
        Self {
            base: format!("{prefix}:{{jobs}}:"),
            registry: format!("{prefix}:{{registry}}:"),
        }
    }
    fn job(&self, id: &str) -> String {
        format!("{}job:{id}", self.base)
    }
    fn index(&self) -> String {
        format!("{}index", self.base)
    }
    fn queue(&self) -> String {
        format!("{}queue", self.base)
    }
    fn changes(&self) -> String {
        format!("{}changes", self.base)
    }
    fn open(&self, owner: &str) -> String {
        format!("{}open:{owner}", self.base)
    }
    fn names(&self) -> String {
        format!("{}names", self.registry)
    }
    fn owners(&self) -> String {
        format!("{}owners", self.registry)
    }
    fn next_version(&self, name: &str) -> String {
        format!("{}{name}:next", self.registry)
    }
    fn versions(&self, name: &str) -> String {
        format!("{}{name}", self.registry)
    }
    fn pins(&self, name: &str) -> String {
        format!("{}{name}:pins", self.registry)
    }
    fn retired(&self) -> String {
        format!("{}retired", self.registry)
    }
}

impl JobStore {
    /// An empty in-memory store: the embedded default.
    pub fn memory(config: StoreConfig) -> Self {
        Self {
            keys: JobKeys::new(&config.prefix),
            backend: Backend::Memory(MemoryJobs::default()),
        }
    }

    /// The jobs and the registry on the Redis deployment `redis`.
    pub fn redis(redis: &RedisConnection, config: StoreConfig) -> Self {
        Self {
            keys: JobKeys::new(&config.prefix),
            backend: Backend::Redis(RedisJobs::new(redis.clone())),
        }
    }

    /// Stores a new job record (revision 1) and queues the job, held to `quota` (its
    /// owner's count of open jobs and the check against the limit are one step with the
    /// submission); nothing changes unless it is queued.
    #[tracing::instrument(skip_all)]
    pub async fn submit_job(
        &self,
        id: &str,
        body: &[u8],
        quota: Option<Quota<'_>>,
    ) -> Result<Submitted> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.submit(id, body, quota)),
            Backend::Redis(r) => r.submit_job(&self.keys, id, body, quota).await,
        }
    }

    /// Reads a job record.
    pub async fn get_job(&self, id: &str) -> Result<Option<Revised>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().get(id)),
            Backend::Redis(r) => r.get_job(&self.keys.job(id)).await,
        }
    }

    /// The most recently submitted `limit` job records, newest first.
    pub async fn list_jobs(&self, limit: usize) -> Result<Vec<Revised>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().page(0, limit, true)),
            Backend::Redis(r) => r.list_jobs(&self.keys, (0, limit), true).await,
        }
    }

    /// `limit` job records from place `from` in submission order, oldest first (one
    /// deleted meanwhile is left out).
    pub async fn oldest_jobs(&self, from: usize, limit: usize) -> Result<Vec<Revised>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().page(from, limit, false)),
            Backend::Redis(r) => r.list_jobs(&self.keys, (from, limit), false).await,
        }
    }

    /// Writes a job record if it is still at `revision`: the new revision, or `None` when
    /// another writer moved it (read it again) or it does not exist. A write that ends
    /// the job names its owner (`ends_for`): it leaves the owner's open jobs.
    pub async fn update_job(
        &self,
        id: &str,
        revision: u64,
        body: &[u8],
        ends_for: Option<&str>,
    ) -> Result<Option<u64>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.update(id, revision, body, ends_for)),
            Backend::Redis(r) => {
                r.update_job(&self.keys, id, (revision, body), ends_for)
                    .await
            }
        }
    }

    /// Deletes job record `id` if it is still at `revision` (its queue entry is gone once
    /// the job ended): false when another writer moved it or it does not exist.
    pub async fn delete_job(&self, id: &str, revision: u64) -> Result<bool> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.delete(id, revision)),
            Backend::Redis(r) => r.delete_job(&self.keys, id, revision).await,
        }
    }

    /// Where the changes of job records stand now: [`JobStore::job_changes`] from it
    /// returns only later ones.
    pub async fn job_changes_cursor(&self) -> Result<ChangeCursor> {
        Ok(ChangeCursor(match &self.backend {
            Backend::Memory(m) => m.lock().last_change().to_string(),
            Backend::Redis(r) => r.last_change(&self.keys.changes()).await?,
        }))
    }

    /// Waits up to `wait` for job records to change (be updated or deleted) after
    /// `cursor`, which moves past them: the ids of the jobs changed, in order (empty
    /// when none changed in time). The store keeps the last thousand or so changes: a
    /// cursor older than those misses some, so a watcher also reads its job now and
    /// then.
    pub async fn job_changes(
        &self,
        cursor: &mut ChangeCursor,
        wait: Duration,
    ) -> Result<Vec<String>> {
        match &self.backend {
            Backend::Memory(m) => {
                let from = cursor.0.parse().unwrap_or(0);
                let (ids, next) = m.changes_after(from, wait).await;
                cursor.0 = next.to_string();
                Ok(ids)
            }
            Backend::Redis(r) => {
                let (ids, next) = r
                    .changes_after(&self.keys.changes(), &cursor.0, wait)
                    .await?;
                cursor.0 = next;
                Ok(ids)
            }
        }
    }

    /// Takes the next job for `trainer`: an entry another trainer stopped touching for
    /// `lease` first, else the oldest never taken; `None` when there is none.
    #[tracing::instrument(skip(self))]
    pub async fn claim_job(&self, trainer: &str, lease: Duration) -> Result<Option<JobClaim>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().claim(trainer, lease)),
            Backend::Redis(r) => r.claim_job(&self.keys.queue(), trainer, lease).await,
        }
    }

    /// [`JobStore::claim_job`], and when it finds none, a wait of up to `wait` for a new
    /// job (a blocking read of the queue: one submitted meanwhile is taken at once), so an
    /// idle trainer neither polls nor lags; `None` when none came.
    #[tracing::instrument(skip(self))]
    pub async fn wait_for_job(
        &self,
        trainer: &str,
        lease: Duration,
        wait: Duration,
    ) -> Result<Option<JobClaim>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.wait_for_job(trainer, lease, wait).await),
            Backend::Redis(r) => {
                let queue = self.keys.queue();
                match r.claim_job(&queue, trainer, lease).await? {
                    Some(claim) => Ok(Some(claim)),
                    None => r.wait_for_new(&queue, trainer, wait).await,
                }
            }
        }
    }

    /// Renews `trainer`'s hold on `claim`: false when another trainer has taken the entry
    /// since (the caller must stop working on the job at once).
    pub async fn touch_job(&self, claim: &JobClaim, trainer: &str) -> Result<bool> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().touch(&claim.entry, trainer)),
            Backend::Redis(r) => r.touch_job(&self.keys.queue(), &claim.entry, trainer).await,
        }
    }

    /// Hands `trainer`'s claim back (a graceful stop): the next claim takes the job at
    /// once, and does not count this stop among its deliveries, as it would count a
    /// trainer that died. False when another trainer holds the entry by now.
    pub async fn release_job(&self, claim: &JobClaim, trainer: &str) -> Result<bool> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().release(&claim.entry, trainer)),
            Backend::Redis(r) => r.release_job(&self.keys.queue(), claim, trainer).await,
        }
    }

    /// Removes a claimed entry from the queue: its job has ended.
    pub async fn finish_job(&self, claim: &JobClaim) -> Result<()> {
        match &self.backend {
            Backend::Memory(m) => {
                m.lock().finish(&claim.entry);
                Ok(())
            }
            Backend::Redis(r) => r.finish_job(&self.keys.queue(), &claim.entry).await,
        }
    }

    /// Hands out the next version number of model `name` (1 for its first); numbers are
    /// never handed out twice, even when a publication that took one never completes.
    pub async fn next_model_version(&self, name: &str) -> Result<u64> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().next_version(name)),
            Backend::Redis(r) => r.next_version(&self.keys.next_version(name)).await,
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
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().record_version(name, version, body)),
            Backend::Redis(r) => r.record_version(&self.keys, name, version, body).await,
        }
    }

    /// The recorded versions of model `name`, oldest first (none for an unknown name).
    pub async fn model_versions(&self, name: &str) -> Result<Vec<(u64, Vec<u8>)>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().versions(name)),
            Backend::Redis(r) => r.versions(&self.keys.versions(name)).await,
        }
    }

    /// Claims model `name` for `owner` (an API key's id) unless it has an owner: the
    /// name's owner now, `None` for a name published before names had owners (which
    /// stays unowned). Atomic: of two keys claiming a new name, one owns it.
    pub async fn claim_model_name(&self, name: &str, owner: &str) -> Result<Option<String>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().claim_name(name, owner)),
            Backend::Redis(r) => r.claim_name(&self.keys, name, owner).await,
        }
    }

    /// The API key id owning model `name`, if it has an owner.
    pub async fn model_owner(&self, name: &str) -> Result<Option<String>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().owner(name)),
            Backend::Redis(r) => r.owner(&self.keys.owners(), name).await,
        }
    }

    /// Retires version `version` of model `name` unless it is pinned: its record goes at
    /// once (atomically with the pin check) and `(name, version)` joins the versions
    /// whose files await removal ([`JobStore::retired_model_versions`]).
    pub async fn retire_model_version(&self, name: &str, version: u64) -> Result<Retirement> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().retire(name, version)),
            Backend::Redis(r) => r.retire(&self.keys, name, version).await,
        }
    }

    /// Pins (or unpins) a recorded version: false when there is no such version.
    pub async fn pin_model_version(&self, name: &str, version: u64, pinned: bool) -> Result<bool> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().pin(name, version, pinned)),
            Backend::Redis(r) => r.pin(&self.keys, name, version, pinned).await,
        }
    }

    /// The pinned versions of model `name`, ascending.
    pub async fn model_pins(&self, name: &str) -> Result<Vec<u64>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().pins(name)),
            Backend::Redis(r) => r.pins(&self.keys.pins(name)).await,
        }
    }

    /// Retired versions whose files await removal, as `(name, version)`.
    pub async fn retired_model_versions(&self) -> Result<Vec<(String, u64)>> {
        let members = match &self.backend {
            Backend::Memory(m) => m.lock().retired(),
            Backend::Redis(r) => r.retired(&self.keys.retired()).await?,
        };
        Ok(members
            .iter()
            .filter_map(|m| {
                let (name, version) = m.rsplit_once('/')?;
                Some((name.to_string(), version.parse().ok()?))
            })
            .collect())
    }

    /// Forgets a retired version whose files are removed.
    pub async fn forget_retired_model_version(&self, name: &str, version: u64) -> Result<()> {
        let member = format!("{name}/{version}");
        match &self.backend {
            Backend::Memory(m) => {
                m.lock().forget_retired(&member);
                Ok(())
            }
            Backend::Redis(r) => r.forget_retired(&self.keys.retired(), &member).await,
        }
    }

    /// The names of the models with a recorded version, sorted.
    pub async fn model_names(&self) -> Result<Vec<String>> {
        match &self.backend {
            Backend::Memory(m) => Ok(m.lock().names()),
            Backend::Redis(r) => r.names(&self.keys.names()).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_keeps_the_contract() {
        crate::contract::check_jobs(JobStore::memory(StoreConfig::default())).await;
    }
}
