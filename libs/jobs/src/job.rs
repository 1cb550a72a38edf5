//! A job's record and [`Jobs`], the records and the queue in the store. Every change of a
//! record is a compare-and-set on its revision, so the API's cancel and the trainer's
//! progress never overwrite each other.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bd3lm_kvstore::{JobClaim, JobStore, Quota, Revised, Submitted};
use bd3lm_proto::v1 as wire;
use serde::{Deserialize, Serialize};

use crate::{Error, JobSpec, Result};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a trainer.
    Queued,
    /// A trainer works on it.
    Running,
    /// Trained and published.
    Succeeded,
    /// Ended without a result.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// How far a job has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Loss of the last step.
    #[serde(with = "crate::figure")]
    pub loss: f64,
    /// Tokens per second of the last step.
    #[serde(with = "crate::figure")]
    pub tokens_per_s: f64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Seconds to the end at the current speed.
    #[serde(with = "crate::figure")]
    pub eta_s: f64,
    /// The latest validation: step, NELBO, perplexity bound.
    #[serde(with = "crate::figure::step_pair")]
    pub validation: Option<(u64, f64, f64)>,
}

/// A job's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// 32 hex digits.
    pub id: String,
    /// The API key that submitted it (a hash), `None` on an open API: only that key sees
    /// and cancels it.
    pub owner: Option<String>,
    /// What to train.
    pub spec: JobSpec,
    /// Where it is.
    pub state: JobState,
    /// How far it has come.
    pub progress: Progress,
    /// Why it failed.
    pub error: String,
    /// Trainers that have taken it.
    pub attempts: u32,
    /// Versions it published.
    pub published: Vec<u64>,
    /// Submission time, ms since the Unix epoch.
    pub submitted_ms: u64,
    /// Time of the last change.
    pub updated_ms: u64,
    /// A cancel was asked for.
    pub cancel_requested: bool,
    /// The store's revision this record was read at.
    #[serde(skip)]
    pub revision: u64,
}

impl Job {
    /// The job as the API shows it.
    pub fn to_wire(&self) -> wire::Job {
        let state = match self.state {
            JobState::Queued => wire::JobState::Queued,
            JobState::Running => wire::JobState::Running,
            JobState::Succeeded => wire::JobState::Succeeded,
            JobState::Failed => wire::JobState::Failed,
            JobState::Cancelled => wire::JobState::Cancelled,
        };
        let p = &self.progress;
        wire::Job {
            job_id: self.id.clone(),
            spec: Some(self.spec.to_wire()),
            state: state as i32,
            progress: Some(wire::JobProgress {
                step: p.step,
                total_steps: self.spec.recipe.steps,
                loss: p.loss,
                tokens_per_s: p.tokens_per_s,
                tokens: p.tokens,
                eta_seconds: p.eta_s,
                validation: p.validation.map(|(step, nelbo, ppl)| wire::Validation {
                    step,
                    nelbo,
                    perplexity_bound: ppl,
                }),
            }),
            error: self.error.clone(),
            attempts: self.attempts,
            published_versions: self.published.clone(),
            submitted_unix_ms: self.submitted_ms,
            updated_unix_ms: self.updated_ms,
            cancel_requested: self.cancel_requested && !self.state.is_terminal(),
        }
    }

    fn decode(stored: Revised) -> Result<Self> {
        let mut job: Job = serde_json::from_slice(&stored.body)
            .map_err(|e| Error::Corrupt(format!("job record: {e}")))?;
        job.revision = stored.revision;
        Ok(job)
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a job serializes")
    }
}

/// The jobs in a store.
#[derive(Clone)]
pub struct Jobs {
    store: JobStore,
}

/// Most jobs one listing returns.
pub const MAX_LIST: usize = 1000;

/// Jobs read per page of a retention sweep.
const SWEEP_PAGE: usize = 256;

impl Jobs {
    /// The jobs of `store`.
    pub fn new(store: JobStore) -> Self {
        Self { store }
    }

    /// The store they live in.
    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// Records a new job of `owner` and queues it, unless the owner has `limit` jobs
    /// queued or running already (RESOURCE_EXHAUSTED; 0: no limit): the count and the
    /// submission are one step in the store, so a burst never passes the limit.
    #[tracing::instrument(skip_all)]
    pub async fn submit_within(
        &self,
        spec: JobSpec,
        owner: Option<String>,
        limit: usize,
    ) -> Result<Job> {
        let now = now_ms();
        let job = Job {
            id: crate::new_id(),
            owner,
            spec,
            state: JobState::Queued,
            progress: Progress::default(),
            error: String::new(),
            attempts: 0,
            published: Vec::new(),
            submitted_ms: now,
            updated_ms: now,
            cancel_requested: false,
            revision: 1,
        };
        let quota = job.owner.as_deref().map(|owner| Quota { owner, limit });
        match self.store.submit_job(&job.id, &job.encode(), quota).await? {
            Submitted::Queued { .. } => {}
            Submitted::Exists => return Err(Error::Corrupt("a new job id was taken".into())),
            Submitted::OverQuota { open } => {
                return Err(Error::Exhausted(format!(
                    "this API key has {open} jobs queued or running, its limit of {limit}; cancel one or wait"
                )));
            }
        }
        tracing::info!(job = %job.id, "job queued");
        Ok(job)
    }

    /// Records a new job of `owner` and queues it, without a limit on the owner's jobs.
    pub async fn submit(&self, spec: JobSpec, owner: Option<String>) -> Result<Job> {
        self.submit_within(spec, owner, 0).await
    }

    /// Reads job `id`.
    pub async fn get(&self, id: &str) -> Result<Option<Job>> {
        self.store.get_job(id).await?.map(Job::decode).transpose()
    }

    /// Reads job `id` for the key `owner`: NOT_FOUND naming it when there is none or it
    /// is another key's.
    pub async fn get_owned(&self, id: &str, owner: Option<&str>) -> Result<Job> {
        let missing = || Error::NotFound(format!("job_id: no job {id}"));
        if !bd3lm_kvstore::record::is_session_id(id) {
            return Err(Error::invalid("job_id", "must be 32 lowercase hex digits"));
        }
        let job = self.get(id).await?.ok_or_else(missing)?;
        if owner.is_some() && job.owner.as_deref() != owner {
            return Err(missing());
        }
        Ok(job)
    }

    /// The latest `limit` jobs of `owner` (all jobs on an open API), newest first.
    pub async fn list(&self, limit: usize, owner: Option<&str>) -> Result<Vec<Job>> {
        // Another key's jobs are skipped: read further back for them.
        let read = if owner.is_some() { MAX_LIST } else { limit };
        let stored = self.store.list_jobs(read).await?;
        let mut jobs = Vec::new();
        for s in stored {
            // One record that does not decode is skipped (and counted), never the
            // listing of every key failed for it.
            let job = match Job::decode(s) {
                Ok(job) => job,
                Err(e) => {
                    crate::undecodable("job", &e);
                    continue;
                }
            };
            if owner.is_none() || job.owner.as_deref() == owner {
                jobs.push(job);
            }
            if jobs.len() == limit {
                break;
            }
        }
        Ok(jobs)
    }

    /// Applies `change` to job `id` until it is stored over the revision it read (another
    /// writer in between makes it read again); returns the record as written.
    pub async fn update(&self, id: &str, mut change: impl FnMut(&mut Job)) -> Result<Job> {
        loop {
            let mut job = self
                .get(id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("job_id: no job {id}")))?;
            change(&mut job);
            job.updated_ms = now_ms();
            // An ended job leaves its owner's count (again, harmlessly, at later writes).
            let ends_for = job.owner.as_deref().filter(|_| job.state.is_terminal());
            if let Some(revision) = self
                .store
                .update_job(id, job.revision, &job.encode(), ends_for)
                .await?
            {
                job.revision = revision;
                return Ok(job);
            }
        }
    }

    /// Cancels job `id` of `owner`: a queued one ends at once, a running one when its
    /// trainer next looks (within a step); an ended one stays as it is.
    #[tracing::instrument(skip(self, owner))]
    pub async fn cancel(&self, id: &str, owner: Option<&str>) -> Result<Job> {
        self.get_owned(id, owner).await?;
        self.update(id, |job| match job.state {
            JobState::Queued => job.state = JobState::Cancelled,
            JobState::Running => job.cancel_requested = true,
            _ => {}
        })
        .await
    }

    /// Deletes ended job `id` of `owner`: its record, and so its place in listings (the
    /// trainers remove its run directory at their next sweep). FAILED_PRECONDITION while
    /// it is queued or runs. The job as it was.
    #[tracing::instrument(skip(self, owner))]
    pub async fn delete(&self, id: &str, owner: Option<&str>) -> Result<Job> {
        loop {
            let job = self.get_owned(id, owner).await?;
            if !job.state.is_terminal() {
                return Err(Error::Precondition(format!(
                    "job_id: job {id} has not ended; cancel it first"
                )));
            }
            if self.store.delete_job(id, job.revision).await? {
                tracing::info!("job deleted");
                return Ok(job);
            }
        }
    }

    /// Deletes the records of jobs that ended more than `retention` ago, oldest first;
    /// how many. A job submitted within `retention` cannot have ended before it, so the
    /// sweep stops at the first one.
    pub async fn sweep_ended(&self, retention: Duration) -> Result<usize> {
        let horizon = now_ms().saturating_sub(retention.as_millis() as u64);
        let (mut kept, mut deleted) = (0, 0);
        loop {
            // Deleted records leave the index: the next page starts after the kept ones.
            let page = self.store.oldest_jobs(kept, SWEEP_PAGE).await?;
            let read = page.len();
            for stored in page {
                let Ok(job) = Job::decode(stored) else {
                    kept += 1;
                    continue;
                };
                if job.submitted_ms > horizon {
                    return Ok(deleted);
                }
                let expired = job.state.is_terminal() && job.updated_ms <= horizon;
                if expired && self.store.delete_job(&job.id, job.revision).await? {
                    deleted += 1;
                } else {
                    kept += 1;
                }
            }
            if read < SWEEP_PAGE {
                return Ok(deleted);
            }
        }
    }

    /// Takes the next job for trainer `trainer` (see [`JobStore::claim_job`]).
    pub async fn claim(&self, trainer: &str, lease: Duration) -> Result<Option<JobClaim>> {
        Ok(self.store.claim_job(trainer, lease).await?)
    }

    /// Takes the next job for `trainer`, waiting up to `wait` for one to be submitted
    /// (see [`JobStore::wait_for_job`]).
    pub async fn wait_for(
        &self,
        trainer: &str,
        lease: Duration,
        wait: Duration,
    ) -> Result<Option<JobClaim>> {
        Ok(self.store.wait_for_job(trainer, lease, wait).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_kvstore::StoreConfig;
    use bd3lm_training::test_util::{counting_docs, shards};

    /// A job of the spec tests' shape on `store`, its data in `dir`.
    async fn submitted(jobs: &Jobs, dir: &std::path::Path) -> Job {
        let (data, _) = shards(dir, &counting_docs(12, 50), 16, 4);
        let registry = crate::Registry::records(jobs.store().clone());
        let spec = crate::spec::tests::spec(&data);
        let spec = JobSpec::validate(spec, dir, &registry).await.unwrap();
        jobs.submit(spec, Some("key-a".into())).await.unwrap()
    }

    /// A diverged job (its loss and perplexity bound infinite, its speed NaN) is stored,
    /// listed and shown with those figures; a record that does not decode is skipped by
    /// the listing, which still shows every other job.
    #[tokio::test]
    async fn diverged_and_undecodable_records_leave_listings_working() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(JobStore::memory(StoreConfig::default()));
        let job = submitted(&jobs, dir.path()).await;
        jobs.update(&job.id, |j| {
            j.progress.loss = f64::INFINITY;
            j.progress.tokens_per_s = f64::NAN;
            j.progress.validation = Some((10, f64::INFINITY, f64::INFINITY));
        })
        .await
        .unwrap();
        jobs.store()
            .submit_job("f".repeat(32).as_str(), b"{not json", None)
            .await
            .unwrap();
        let listed = jobs.list(10, None).await.unwrap();
        assert_eq!(listed.len(), 1, "the undecodable record is skipped");
        let shown = listed[0].to_wire().progress.unwrap();
        assert!(shown.loss.is_infinite() && shown.tokens_per_s.is_nan());
        assert!(shown.validation.unwrap().perplexity_bound.is_infinite());
        assert_eq!(jobs.list(10, Some("key-a")).await.unwrap().len(), 1);
    }

    /// Only an ended job is deleted, by its key only; it then leaves the listing and
    /// reads as NOT_FOUND.
    #[tokio::test]
    async fn only_an_ended_job_is_deleted_and_only_by_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(JobStore::memory(StoreConfig::default()));
        let job = submitted(&jobs, dir.path()).await;
        let running = jobs.delete(&job.id, Some("key-a")).await.unwrap_err();
        assert_eq!(
            tonic::Status::from(running).code(),
            tonic::Code::FailedPrecondition
        );
        jobs.cancel(&job.id, Some("key-a")).await.unwrap();
        let theirs = jobs.delete(&job.id, Some("key-b")).await.unwrap_err();
        assert_eq!(tonic::Status::from(theirs).code(), tonic::Code::NotFound);
        jobs.delete(&job.id, Some("key-a")).await.unwrap();
        assert!(jobs.list(10, None).await.unwrap().is_empty());
        let gone = jobs.get_owned(&job.id, Some("key-a")).await.unwrap_err();
        assert_eq!(tonic::Status::from(gone).code(), tonic::Code::NotFound);
    }

    /// A retention sweep deletes the jobs that ended before the retention, and keeps
    /// those still queued or running and those that ended within it.
    #[tokio::test]
    async fn a_retention_sweep_deletes_only_jobs_ended_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(JobStore::memory(StoreConfig::default()));
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(submitted(&jobs, dir.path()).await.id);
        }
        jobs.cancel(&ids[0], None).await.unwrap();
        jobs.cancel(&ids[2], None).await.unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(
            jobs.sweep_ended(hour).await.unwrap(),
            0,
            "they ended just now"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let swept = jobs.sweep_ended(Duration::from_millis(10)).await.unwrap();
        assert_eq!(swept, 2);
        let left: Vec<String> = jobs
            .list(10, None)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(left, vec![ids[1].clone()], "the queued one stays");
    }

    /// Job records mutated at random decode or fail to, never panic.
    #[tokio::test]
    async fn fuzzed_job_records_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(JobStore::memory(StoreConfig::default()));
        let mut job = submitted(&jobs, dir.path()).await;
        job.progress.validation = Some((3, 1.5, f64::INFINITY));
        let seeds = [job.encode()];
        bd3lm_bytes::fuzz::fuzz("job record", &seeds, Duration::from_secs(1), |body| {
            let _ = Job::decode(Revised {
                revision: 1,
                body: body.to_vec(),
            });
        });
    }
}
