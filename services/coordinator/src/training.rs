//! The public `Training` service: job specs validated (their data must be visible here at
//! the path the trainers see), jobs recorded and queued in the store for the trainer
//! workers, and the model registry's records. Jobs belong to the API key that submitted
//! them, as sessions do; a model name to the key that first submitted a job publishing
//! under it (or an administrator's key); the registry is readable by every key.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bd3lm_jobs::job::MAX_LIST;
use bd3lm_jobs::{JobSpec, Jobs, Registry};
use bd3lm_kvstore::JobStore;
use bd3lm_proto::auth::Caller;
use bd3lm_proto::v1 as wire;
use bd3lm_proto::v1::training_server::Training;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::service::{RequestId, caller};
use crate::settings::{CoordinatorSettings, JobLimits};

/// Longest wait of the change reader on the store before it looks again whether any
/// watch is open.
const CHANGES_WAIT: Duration = Duration::from_secs(5);

/// The Training service over a store.
#[derive(Clone)]
pub struct TrainingService {
    jobs: Jobs,
    registry: Registry,
    data_root: Option<PathBuf>,
    /// Open WatchJob streams by API key ("" on an open API), and the most one may hold.
    watches: Arc<Mutex<HashMap<String, usize>>>,
    max_watches: usize,
    /// The changes of job records, fanned out to this process' watches.
    changes: Changes,
    limits: JobLimits,
}

/// One reader of the store's job changes per process, blocking on the store while any
/// watch is open and idle otherwise; each watch subscribes and wakes on its job's id.
#[derive(Clone)]
struct Changes {
    tx: broadcast::Sender<String>,
    /// Wakes the idle reader when a watch opens.
    opened: Arc<Notify>,
    /// How often a watch reads its job without a notification.
    poll: Duration,
}

impl Changes {
    /// Starts the reader over `store`.
    fn spawn(store: JobStore, poll: Duration) -> Self {
        let (tx, _) = broadcast::channel(1024);
        let changes = Self {
            tx,
            opened: Arc::default(),
            poll,
        };
        tokio::spawn(changes.clone().read(store));
        changes
    }

    /// Subscribes a watch (before it reads its job, so no change after the read is
    /// missed once the reader runs).
    fn subscribe(&self) -> broadcast::Receiver<String> {
        let rx = self.tx.subscribe();
        self.opened.notify_one();
        rx
    }

    async fn read(self, store: JobStore) {
        let mut cursor = None;
        loop {
            if self.tx.receiver_count() == 0 {
                // Idle: a cursor from before would replay what no watch waits for.
                cursor = None;
                let _ = tokio::time::timeout(CHANGES_WAIT, self.opened.notified()).await;
                continue;
            }
            let read = async {
                let cursor = match &mut cursor {
                    Some(cursor) => cursor,
                    None => cursor.insert(store.job_changes_cursor().await?),
                };
                store.job_changes(cursor, CHANGES_WAIT).await
            };
            match read.await {
                Ok(ids) => ids.into_iter().for_each(|id| {
                    let _ = self.tx.send(id);
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "reading job changes failed; watches poll meanwhile");
                    tokio::time::sleep(self.poll).await;
                }
            }
        }
    }
}

/// One open watch, counted against its key until dropped.
struct Watching {
    watches: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = watches.get_mut(&self.key) {
            *open -= 1;
            if *open == 0 {
                watches.remove(&self.key);
            }
        }
    }
}

impl TrainingService {
    /// Jobs and registry records in `store`, held to `settings`: job data under its
    /// training data root (no jobs are taken without one), its job limits and its
    /// watches per key.
    pub fn new(store: JobStore, settings: &CoordinatorSettings) -> Self {
        Self {
            jobs: Jobs::new(store.clone()),
            registry: Registry::records(store.clone()),
            data_root: settings.training_data_root.clone(),
            watches: Arc::default(),
            max_watches: settings.max_watches_per_key as usize,
            changes: Changes::spawn(store, settings.job_watch_poll),
            limits: settings.jobs.clone(),
        }
    }

    /// Deletes the records of jobs that ended more than the retention ago, every tenth of
    /// it (at most hourly), for as long as the process runs. Concurrent sweeps of several
    /// coordinators are harmless: each deletion is at the revision read.
    pub fn spawn_retention(&self) {
        let (jobs, retention) = (self.jobs.clone(), self.limits.job_retention);
        let every = (retention / 10).min(Duration::from_secs(3600));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match jobs.sweep_ended(retention).await {
                    Ok(0) => {}
                    Ok(deleted) => {
                        tracing::info!(deleted, "ended jobs past their retention deleted")
                    }
                    Err(e) => tracing::warn!(error = %e, "sweeping ended jobs failed"),
                }
            }
        });
    }

    /// Counts a watch for `key`, or refuses it at the limit.
    fn open_watch(&self, key: Option<&str>) -> Result<Watching, Status> {
        let key = key.unwrap_or_default().to_string();
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let open = watches.entry(key.clone()).or_default();
        if *open >= self.max_watches {
            bd3lm_telemetry::metrics::refused("job_watches");
            return Err(Status::resource_exhausted(format!(
                "job_id: this API key has {open} job watches open, its limit; close one"
            )));
        }
        *open += 1;
        Ok(Watching {
            watches: self.watches.clone(),
            key,
        })
    }

    /// Streams job `id` until it ends or the client goes away: its state at once, then
    /// again each time a notification names it (or the poll interval passes).
    async fn watch(
        jobs: Jobs,
        changes: Changes,
        id: String,
        tx: mpsc::Sender<Result<wire::Job, Status>>,
        _watching: Watching,
    ) {
        let mut notified = changes.subscribe();
        let mut seen = 0;
        loop {
            let job = match jobs.get(&id).await {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            if job.revision != seen {
                seen = job.revision;
                if tx.send(Ok(job.to_wire())).await.is_err() {
                    return;
                }
            }
            if job.state.is_terminal() {
                return;
            }
            let poll = tokio::time::sleep(changes.poll);
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    changed = notified.recv() => match changed {
                        Ok(changed) if changed != id => continue,
                        // Ours, or notifications missed: read the job.
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => (&mut poll).await,
                    },
                    _ = &mut poll => break,
                    _ = tx.closed() => return,
                }
            }
        }
    }
}

/// Runs one call in its span and answers it with its request id.
macro_rules! call {
    ($method:literal, $span:literal, $body:expr) => {{
        let id = RequestId::new($method);
        id.answer(async { $body }.instrument(id.span($span)).await)
    }};
}

#[tonic::async_trait]
impl Training for TrainingService {
    type WatchJobStream = ReceiverStream<Result<wire::Job, Status>>;

    async fn submit_job(
        &self,
        request: Request<wire::JobSpec>,
    ) -> Result<Response<wire::Job>, Status> {
        call!("SubmitJob", "submit_job", {
            let (key, admin) = rights(&request);
            let owner = key.map(str::to_string);
            let Some(root) = self.data_root.as_deref() else {
                return Err(Status::failed_precondition(
                    "data: this server takes no training jobs (it has no training data root)",
                ));
            };
            let bounds = self.limits.bounds();
            let spec =
                JobSpec::validate_within(request.into_inner(), root, &self.registry, &bounds)
                    .await?;
            // A model name is its first key's to publish under (an open API has no keys).
            if let Some(key) = &owner {
                self.registry.claim(&spec.publish_as, key, admin).await?;
            }
            let limit = self.limits.max_jobs_per_key;
            let job = self.jobs.submit_within(spec, owner, limit).await;
            let job = job.inspect_err(|e| {
                if let bd3lm_jobs::Error::Exhausted(_) = e {
                    bd3lm_telemetry::metrics::refused("jobs_per_key");
                }
            })?;
            Ok(Response::new(job.to_wire()))
        })
    }

    async fn get_job(
        &self,
        request: Request<wire::GetJobRequest>,
    ) -> Result<Response<wire::Job>, Status> {
        call!("GetJob", "get_job", {
            let owner = caller(&request);
            let job = self
                .jobs
                .get_owned(&request.get_ref().job_id, owner.as_deref())
                .await?;
            Ok(Response::new(job.to_wire()))
        })
    }

    async fn list_jobs(
        &self,
        request: Request<wire::ListJobsRequest>,
    ) -> Result<Response<wire::ListJobsResponse>, Status> {
        call!("ListJobs", "list_jobs", {
            let owner = caller(&request);
            let limit = request.get_ref().limit.unwrap_or(50) as usize;
            if !(1..=MAX_LIST).contains(&limit) {
                return Err(Status::invalid_argument(format!(
                    "limit: must be 1 to {MAX_LIST}"
                )));
            }
            let jobs = self.jobs.list(limit, owner.as_deref()).await?;
            let jobs = jobs.iter().map(|j| j.to_wire()).collect();
            Ok(Response::new(wire::ListJobsResponse { jobs }))
        })
    }

    async fn watch_job(
        &self,
        request: Request<wire::GetJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        call!("WatchJob", "watch_job", {
            let owner = caller(&request);
            let id = request.into_inner().job_id;
            self.jobs.get_owned(&id, owner.as_deref()).await?;
            let watching = self.open_watch(owner.as_deref())?;
            let (tx, rx) = mpsc::channel(4);
            let (jobs, changes) = (self.jobs.clone(), self.changes.clone());
            let watch = Self::watch(jobs, changes, id, tx, watching);
            tokio::spawn(watch.in_current_span());
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }

    async fn cancel_job(
        &self,
        request: Request<wire::CancelJobRequest>,
    ) -> Result<Response<wire::Job>, Status> {
        call!("CancelJob", "cancel_job", {
            let owner = caller(&request);
            let job = self
                .jobs
                .cancel(&request.get_ref().job_id, owner.as_deref())
                .await?;
            Ok(Response::new(job.to_wire()))
        })
    }

    async fn delete_job(
        &self,
        request: Request<wire::DeleteJobRequest>,
    ) -> Result<Response<wire::Job>, Status> {
        call!("DeleteJob", "delete_job", {
            let owner = caller(&request);
            let job = self
                .jobs
                .delete(&request.get_ref().job_id, owner.as_deref())
                .await?;
            Ok(Response::new(job.to_wire()))
        })
    }

    async fn list_models(
        &self,
        _request: Request<wire::ListModelsRequest>,
    ) -> Result<Response<wire::ListModelsResponse>, Status> {
        call!("ListModels", "list_models", {
            let mut models = Vec::new();
            for name in self.registry.names().await? {
                models.push(self.registry.model(&name).await?);
            }
            Ok(Response::new(wire::ListModelsResponse { models }))
        })
    }

    async fn get_model(
        &self,
        request: Request<wire::GetModelRequest>,
    ) -> Result<Response<wire::Model>, Status> {
        call!("GetModel", "get_model", {
            Ok(Response::new(
                self.registry.model(&request.get_ref().name).await?,
            ))
        })
    }

    async fn retire_model_version(
        &self,
        request: Request<wire::ModelVersionRequest>,
    ) -> Result<Response<wire::ModelVersion>, Status> {
        call!("RetireModelVersion", "retire_model_version", {
            self.change_version(&request, None).await
        })
    }

    async fn pin_model_version(
        &self,
        request: Request<wire::ModelVersionRequest>,
    ) -> Result<Response<wire::ModelVersion>, Status> {
        call!("PinModelVersion", "pin_model_version", {
            self.change_version(&request, Some(true)).await
        })
    }

    async fn unpin_model_version(
        &self,
        request: Request<wire::ModelVersionRequest>,
    ) -> Result<Response<wire::ModelVersion>, Status> {
        call!("UnpinModelVersion", "unpin_model_version", {
            self.change_version(&request, Some(false)).await
        })
    }
}

impl TrainingService {
    /// Retires the version `request` names (`pin` unset), or pins or unpins it, for the
    /// caller's key: the version as the registry answers it.
    async fn change_version(
        &self,
        request: &Request<wire::ModelVersionRequest>,
        pin: Option<bool>,
    ) -> Result<Response<wire::ModelVersion>, Status> {
        let (who, target) = (rights(request), request.get_ref());
        let version = target_version(target)?;
        let changed = match pin {
            None => self.registry.retire(&target.name, version, who).await?,
            Some(pinned) => {
                self.registry
                    .pin(&target.name, version, pinned, who)
                    .await?
            }
        };
        Ok(Response::new(changed))
    }
}

/// The caller's API key id (`None` on an open API) and whether it is an administrator's.
fn rights<T>(request: &Request<T>) -> (Option<&str>, bool) {
    match request.extensions().get::<Caller>() {
        Some(c) => (c.key_id.as_deref(), c.admin),
        None => (None, false),
    }
}

/// The version a request names: from 1.
fn target_version(request: &wire::ModelVersionRequest) -> Result<u64, Status> {
    match request.version {
        0 => Err(Status::invalid_argument("version: required, from 1")),
        v => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_kvstore::StoreConfig;

    /// Without a training data root no job is taken, whatever its data: the service
    /// never reads a path it cannot confine.
    #[tokio::test]
    async fn without_a_data_root_no_job_is_taken() {
        let store = JobStore::memory(StoreConfig::default());
        let service = TrainingService::new(store, &CoordinatorSettings::default());
        let spec = wire::JobSpec {
            data: "/".into(),
            steps: 1,
            publish_as: "tiny".into(),
            ..Default::default()
        };
        let refused = service.submit_job(Request::new(spec)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.message().starts_with("data:"), "{refused}");
    }
}
