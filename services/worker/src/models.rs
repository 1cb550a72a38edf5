//! The model versions a worker serves. The latest takes new sessions; a session keeps the
//! version it began on (its KV state is bound to those weights) while that version stays
//! loaded. A superseded version is dropped once no block of it has come for the idle
//! time, or at the end of its grace, whichever is first; its sessions' next blocks then
//! run on the latest version, their KV state rebuilt from their tokens. Each version
//! has its own batch (weights differ, so blocks of two versions never share a pass), and
//! switching between versions happens between batches: a block in a batch finishes on
//! the weights it began with.

use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::scheduler::Scheduler;
use crate::{LoadedModel, WorkerLimits, metrics};

/// One loaded version and its batch.
pub struct ServedVersion {
    /// The weights.
    pub loaded: Arc<LoadedModel>,
    /// Its batch, started with its first block (`None`: the thread could not start).
    scheduler: OnceLock<Option<Scheduler>>,
    /// When it was replaced and last used.
    times: Mutex<VersionTimes>,
}

/// When a served version was replaced and last used: what its retirement goes by.
#[derive(Debug, Clone, Copy)]
struct VersionTimes {
    /// When a newer version replaced it.
    superseded: Option<Instant>,
    /// When a block of it last came.
    used: Instant,
}

impl ServedVersion {
    fn new(loaded: Arc<LoadedModel>) -> Self {
        Self {
            loaded,
            scheduler: OnceLock::new(),
            times: Mutex::new(VersionTimes {
                superseded: None,
                used: Instant::now(),
            }),
        }
    }

    fn times(&self) -> std::sync::MutexGuard<'_, VersionTimes> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its batch, started on first use.
    pub fn scheduler(&self, limits: WorkerLimits) -> Option<&Scheduler> {
        self.scheduler
            .get_or_init(|| {
                Scheduler::start(self.loaded.clone(), limits)
                    .inspect_err(
                        |e| tracing::error!(error = %e, "starting the batch thread failed"),
                    )
                    .ok()
            })
            .as_ref()
    }

    /// Its batch, if started.
    pub fn started(&self) -> Option<&Scheduler> {
        self.scheduler.get().and_then(Option::as_ref)
    }
}

/// How long superseded versions stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    /// Longest a superseded version stays loaded.
    pub grace: Duration,
    /// A superseded version no block came for this long goes earlier.
    pub idle: Duration,
}

/// The versions, oldest first; empty while the first loads.
pub struct Models {
    served: RwLock<Vec<Arc<ServedVersion>>>,
    /// Turns true when the first version is added.
    ready: watch::Sender<bool>,
}

impl Default for Models {
    fn default() -> Self {
        Self {
            served: RwLock::default(),
            ready: watch::channel(false).0,
        }
    }
}

impl Models {
    /// No model yet: the worker answers UNAVAILABLE until one is added.
    pub fn loading() -> Self {
        Self::default()
    }

    /// One fixed model (a checkpoint directory).
    pub fn fixed(loaded: Arc<LoadedModel>) -> Self {
        let models = Self::default();
        models.add(loaded);
        models
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ServedVersion>>> {
        self.served.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `loaded` the latest version; the previous latest starts its grace.
    pub fn add(&self, loaded: Arc<LoadedModel>) {
        let mut served = self.served.write().unwrap_or_else(|e| e.into_inner());
        if let Some(previous) = served.last() {
            previous.times().superseded = Some(Instant::now());
        }
        tracing::info!(version = ?loaded.version, fingerprint = %loaded.fingerprint, "serving a new model version");
        metrics::model_versions(loaded.version, served.len() + 1);
        served.push(Arc::new(ServedVersion::new(loaded)));
        self.ready.send_replace(true);
    }

    /// Resolves once a version is loaded (at once when one is).
    pub async fn loaded(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives as long as `self`, so the wait ends only when a version is added.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    /// The latest version, if one is loaded.
    pub fn latest(&self) -> Option<Arc<ServedVersion>> {
        self.read().last().cloned()
    }

    /// The version a session on `version` runs on: its own while loaded, else the latest
    /// (a new session, one begun before this worker started, or one whose version was
    /// dropped). Counts as a use of the version returned.
    pub fn for_session(&self, version: Option<u64>) -> Option<Arc<ServedVersion>> {
        let served = self.read();
        let own = version.and_then(|v| served.iter().find(|s| s.loaded.version == Some(v)));
        let chosen = own.or(served.last()).cloned()?;
        chosen.times().used = Instant::now();
        Some(chosen)
    }

    /// Every loaded version number, oldest first.
    pub fn versions(&self) -> Vec<u64> {
        self.read()
            .iter()
            .filter_map(|s| s.loaded.version)
            .collect()
    }

    /// Every loaded version with its batch.
    pub fn all(&self) -> Vec<Arc<ServedVersion>> {
        self.read().clone()
    }

    /// Drops the superseded versions past their grace or idle time; how many went.
    pub fn retire(&self, rollout: Rollout) -> usize {
        let mut served = self.served.write().unwrap_or_else(|e| e.into_inner());
        let before = served.len();
        let latest = served.len().saturating_sub(1);
        let mut index = 0;
        served.retain(|s| {
            let keep = index == latest || {
                let times = *s.times();
                let graced = times
                    .superseded
                    .is_some_and(|t| t.elapsed() < rollout.grace);
                graced && times.used.elapsed() < rollout.idle
            };
            if !keep {
                tracing::info!(version = ?s.loaded.version, "model version dropped");
            }
            index += 1;
            keep
        });
        let gone = before - served.len();
        if gone > 0 {
            let latest = served.last().and_then(|s| s.loaded.version);
            metrics::model_versions(latest, served.len());
        }
        gone
    }
}

/// Model `name` of the registry whose records are in `store` and files in `dir`, loaded
/// on `device` in `precision`: what a worker started with `--model` serves.
pub struct Following {
    /// The registry name, also the model id in store keys.
    pub name: String,
    /// The registry's storage directory.
    pub dir: std::path::PathBuf,
    /// Where versions are loaded.
    pub device: candle_core::Device,
    /// In what precisions.
    pub precision: crate::Precision,
}

impl Following {
    /// Starts following: the models (none until a first version is published), kept
    /// current by a task that loads each new latest version in the background (a newer
    /// one, or the newest left when the served one is retired), adds it, and retires
    /// superseded versions per `settings`. Runs for as long as the worker.
    pub fn start(
        self,
        store: &bd3lm_kvstore::JobStore,
        settings: &crate::FollowSettings,
    ) -> anyhow::Result<Arc<Models>> {
        crate::check_model_id(&self.name)?;
        let models = Arc::new(Models::loading());
        let registry = bd3lm_jobs::Registry::new(store.clone(), self.dir.clone());
        let watch = self.watch(models.clone(), registry, settings.rollout(), settings.poll);
        tokio::spawn(watch);
        Ok(models)
    }

    async fn watch(
        self,
        models: Arc<Models>,
        registry: bd3lm_jobs::Registry,
        rollout: Rollout,
        poll: Duration,
    ) {
        let name = &self.name;
        loop {
            let newest = models.latest().and_then(|s| s.loaded.version);
            match registry.latest(name).await {
                // Any other latest: a newer one published, or the served one retired
                // (a rollback to the newest version left).
                Ok(Some(v)) if newest != Some(v.version) => {
                    match self.load(&registry, v.version).await {
                        Ok(loaded) => models.add(Arc::new(loaded)),
                        Err(e) => {
                            tracing::error!(version = v.version, error = %e, "loading a new model version failed; trying again")
                        }
                    }
                }
                Ok(None) if newest.is_none() => {
                    tracing::info!(%name, "waiting for a first published version")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reading the registry failed"),
            }
            models.retire(rollout);
            tokio::time::sleep(poll).await;
        }
    }

    /// Loads `version` off the async threads.
    async fn load(
        &self,
        registry: &bd3lm_jobs::Registry,
        version: u64,
    ) -> anyhow::Result<LoadedModel> {
        let dir = registry.path(&self.name, version)?;
        let (name, precision, device) = (self.name.clone(), self.precision, self.device.clone());
        let load = move || crate::load(&dir, Some(&name), precision, &device);
        let mut loaded = tokio::task::spawn_blocking(load).await??;
        loaded.version = Some(version);
        Ok(loaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::tests::loaded;

    fn version(v: u64) -> Arc<LoadedModel> {
        let mut loaded = loaded(&format!("f{v}"));
        Arc::get_mut(&mut loaded).unwrap().version = Some(v);
        loaded
    }

    /// Sessions keep their version while it is loaded; new ones, and those of a dropped
    /// version, get the latest; a superseded version goes when idle or past its grace.
    #[test]
    fn sessions_keep_their_version_until_it_is_retired() {
        let models = Models::loading();
        assert!(models.latest().is_none() && models.for_session(None).is_none());
        models.add(version(1));
        models.add(version(2));
        let on = |v| models.for_session(v).unwrap().loaded.version;
        assert_eq!(
            (on(Some(1)), on(None), on(Some(7))),
            (Some(1), Some(2), Some(2))
        );
        let long = Duration::from_secs(3600);
        assert_eq!(
            models.retire(Rollout {
                grace: long,
                idle: long
            }),
            0
        );
        assert_eq!(models.versions(), vec![1, 2]);
        let idle = Rollout {
            grace: long,
            idle: Duration::ZERO,
        };
        assert_eq!(models.retire(idle), 1, "v1 idle");
        assert_eq!((models.versions(), on(Some(1))), (vec![2], Some(2)));
        models.add(version(3));
        on(Some(2));
        assert_eq!(
            models.retire(Rollout {
                grace: Duration::ZERO,
                idle: long
            }),
            1,
            "v2's grace over"
        );
        assert_eq!(
            models.retire(Rollout {
                grace: Duration::ZERO,
                idle: Duration::ZERO
            }),
            0,
            "the latest stays"
        );
        assert_eq!(models.versions(), vec![3]);
    }
}
