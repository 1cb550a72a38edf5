//! The job store in process memory, under one lock (so every operation is atomic, as the
//! Redis scripts are).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{JobClaim, Quota, Retirement, Revised, Submitted};

/// The in-memory jobs, queue and registry. Cloning shares them.
#[derive(Clone, Default)]
pub(super) struct MemoryJobs {
    jobs: Arc<Mutex<Jobs>>,
    /// Woken by every submission, for trainers waiting on an empty queue.
    submitted: Arc<Notify>,
    /// Woken by every change of a record, for watchers.
    changed: Arc<Notify>,
}

impl MemoryJobs {
    pub(super) fn lock(&self) -> MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores and queues a job held to `quota`, waking the trainers that wait.
    pub(super) fn submit(&self, id: &str, body: &[u8], quota: Option<Quota<'_>>) -> Submitted {
        let submitted = self.lock().submit(id, body, quota);
        if let Submitted::Queued { .. } = submitted {
            self.submitted.notify_waiters();
        }
        submitted
    }

    /// Writes a record at `revision`, waking the watchers.
    pub(super) fn update(
        &self,
        id: &str,
        revision: u64,
        body: &[u8],
        ends_for: Option<&str>,
    ) -> Option<u64> {
        let written = self.lock().update(id, revision, body, ends_for);
        if written.is_some() {
            self.changed.notify_waiters();
        }
        written
    }

    /// Deletes a record at `revision`, waking the watchers.
    pub(super) fn delete(&self, id: &str, revision: u64) -> bool {
        let deleted = self.lock().delete(id, revision);
        if deleted {
            self.changed.notify_waiters();
        }
        deleted
    }

    /// The ids of the records changed after change `from`, waiting up to `wait` for one;
    /// and the last change's number.
    pub(super) async fn changes_after(&self, from: u64, wait: Duration) -> (Vec<String>, u64) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the log is read, so a change in between still wakes.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (ids, last) = self.lock().changes_after(from);
            if !ids.is_empty() || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return (ids, last);
            }
        }
    }

    /// Claims a job for `trainer`, waiting up to `wait` for a submission when there is
    /// none.
    pub(super) async fn wait_for_job(
        &self,
        trainer: &str,
        lease: Duration,
        wait: Duration,
    ) -> Option<JobClaim> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the queue is read, so a submission in between still wakes.
            let submitted = self.submitted.notified();
            tokio::pin!(submitted);
            submitted.as_mut().enable();
            if let Some(claim) = self.lock().claim(trainer, lease) {
                return Some(claim);
            }
            if tokio::time::timeout_at(deadline, submitted).await.is_err() {
                return None;
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
    /// Handed back by its trainer: the next claim takes it at once.
    released: bool,
}

/// What the store holds.
#[derive(Default)]
pub(super) struct Jobs {
    records: HashMap<String, Revised>,
    /// Job ids in submission order.
    order: Vec<String>,
    /// Entries never taken, oldest first.
    queue: VecDeque<(String, String)>,
    /// Taken entries, by entry id.
    pending: BTreeMap<String, Pending>,
    entries: u64,
    next_versions: HashMap<String, u64>,
    owners: HashMap<String, String>,
    versions: BTreeMap<String, BTreeMap<u64, Vec<u8>>>,
    pins: HashMap<String, BTreeSet<u64>>,
    retired: BTreeSet<String>,
    /// The latest changes of records (number, job id), as capped as Redis' stream.
    changes: VecDeque<(u64, String)>,
    last_change: u64,
    /// Open job ids by owner.
    open: HashMap<String, BTreeSet<String>>,
}

impl Jobs {
    fn submit(&mut self, id: &str, body: &[u8], quota: Option<Quota<'_>>) -> Submitted {
        if self.records.contains_key(id) {
            return Submitted::Exists;
        }
        let mut open = 0;
        if let Some(quota) = quota {
            let owned = self.open.entry(quota.owner.to_string()).or_default();
            if quota.limit > 0 && owned.len() >= quota.limit {
                return Submitted::OverQuota { open: owned.len() };
            }
            owned.insert(id.to_string());
            open = owned.len();
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
        Submitted::Queued { open }
    }

    pub(super) fn get(&self, id: &str) -> Option<Revised> {
        self.records.get(id).cloned()
    }

    fn delete(&mut self, id: &str, revision: u64) -> bool {
        if self.records.get(id).is_none_or(|r| r.revision != revision) {
            return false;
        }
        self.records.remove(id);
        self.order.retain(|o| o != id);
        self.changed(id);
        true
    }

    /// Logs a change of record `id`.
    fn changed(&mut self, id: &str) {
        self.last_change += 1;
        self.changes.push_back((self.last_change, id.to_string()));
        if self.changes.len() > 1000 {
            self.changes.pop_front();
        }
    }

    pub(super) fn last_change(&self) -> u64 {
        self.last_change
    }

    fn changes_after(&self, from: u64) -> (Vec<String>, u64) {
        let ids = self.changes.iter().filter(|(n, _)| *n > from);
        (ids.map(|(_, id)| id.clone()).collect(), self.last_change)
    }

    pub(super) fn page(&self, from: usize, limit: usize, newest_first: bool) -> Vec<Revised> {
        let ids: Box<dyn Iterator<Item = &String>> = if newest_first {
            Box::new(self.order.iter().rev())
        } else {
            Box::new(self.order.iter())
        };
        ids.skip(from)
            .take(limit)
            .filter_map(|id| self.get(id))
            .collect()
    }

    fn update(
        &mut self,
        id: &str,
        revision: u64,
        body: &[u8],
        ends_for: Option<&str>,
    ) -> Option<u64> {
        let record = self
            .records
            .get_mut(id)
            .filter(|r| r.revision == revision)?;
        record.revision += 1;
        record.body = body.to_vec();
        let revision = record.revision;
        self.changed(id);
        if let Some(owned) = ends_for.and_then(|owner| self.open.get_mut(owner)) {
            owned.remove(id);
        }
        Some(revision)
    }

    pub(super) fn claim(&mut self, trainer: &str, lease: Duration) -> Option<JobClaim> {
        let now = Instant::now();
        let lapsed = self
            .pending
            .iter_mut()
            .find(|(_, p)| p.released || now.duration_since(p.touched) >= lease);
        if let Some((entry, p)) = lapsed {
            p.trainer = trainer.to_string();
            p.touched = now;
            p.released = false;
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
            released: false,
        };
        self.pending.insert(entry.clone(), pending);
        Some(JobClaim {
            job_id: job,
            entry,
            deliveries: 1,
        })
    }

    pub(super) fn touch(&mut self, entry: &str, trainer: &str) -> bool {
        match self.pending.get_mut(entry) {
            Some(p) if p.trainer == trainer => {
                p.touched = Instant::now();
                true
            }
            _ => false,
        }
    }

    pub(super) fn release(&mut self, entry: &str, trainer: &str) -> bool {
        match self.pending.get_mut(entry) {
            Some(p) if p.trainer == trainer => {
                p.released = true;
                p.deliveries = p.deliveries.saturating_sub(1);
                true
            }
            _ => false,
        }
    }

    pub(super) fn finish(&mut self, entry: &str) {
        self.pending.remove(entry);
    }

    pub(super) fn next_version(&mut self, name: &str) -> u64 {
        let next = self.next_versions.entry(name.to_string()).or_insert(0);
        *next += 1;
        *next
    }

    pub(super) fn record_version(&mut self, name: &str, version: u64, body: &[u8]) -> bool {
        let versions = self.versions.entry(name.to_string()).or_default();
        if versions.contains_key(&version) {
            return false;
        }
        versions.insert(version, body.to_vec());
        true
    }

    pub(super) fn versions(&self, name: &str) -> Vec<(u64, Vec<u8>)> {
        self.versions.get(name).map_or(Vec::new(), |v| {
            v.iter().map(|(k, b)| (*k, b.clone())).collect()
        })
    }

    pub(super) fn claim_name(&mut self, name: &str, owner: &str) -> Option<String> {
        if let Some(owner) = self.owners.get(name) {
            return Some(owner.clone());
        }
        if self.versions.contains_key(name) {
            return None;
        }
        self.owners.insert(name.to_string(), owner.to_string());
        Some(owner.to_string())
    }

    pub(super) fn names(&self) -> Vec<String> {
        self.versions.keys().cloned().collect()
    }

    pub(super) fn owner(&self, name: &str) -> Option<String> {
        self.owners.get(name).cloned()
    }

    pub(super) fn retire(&mut self, name: &str, version: u64) -> Retirement {
        let Some(versions) = self.versions.get_mut(name) else {
            return Retirement::NotFound;
        };
        if !versions.contains_key(&version) {
            return Retirement::NotFound;
        }
        if self.pins.get(name).is_some_and(|p| p.contains(&version)) {
            return Retirement::Pinned;
        }
        let body = versions.remove(&version).expect("checked above");
        if versions.is_empty() {
            self.versions.remove(name);
        }
        self.retired.insert(format!("{name}/{version}"));
        Retirement::Retired(body)
    }

    pub(super) fn pin(&mut self, name: &str, version: u64, pinned: bool) -> bool {
        if !self
            .versions
            .get(name)
            .is_some_and(|v| v.contains_key(&version))
        {
            return false;
        }
        let pins = self.pins.entry(name.to_string()).or_default();
        if pinned {
            pins.insert(version);
        } else {
            pins.remove(&version);
        }
        true
    }

    pub(super) fn pins(&self, name: &str) -> Vec<u64> {
        self.pins
            .get(name)
            .map_or(Vec::new(), |p| p.iter().copied().collect())
    }

    pub(super) fn retired(&self) -> Vec<String> {
        self.retired.iter().cloned().collect()
    }

    pub(super) fn forget_retired(&mut self, member: &str) {
        self.retired.remove(member);
    }
}
