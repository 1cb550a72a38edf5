//! The trainer worker: takes jobs from the store's queue one at a time, trains each in its
//! run directory on the shared storage (`{runs}/{job}`: checkpoint, resume state, metrics
//! log), and publishes the result to the registry.
//!
//! A job survives its trainer: the resume state is saved every `save_every` steps, and a
//! job whose trainer stops touching its queue entry for the lease is taken by another
//! trainer, which resumes it from the last save on exactly the curve it was on. A trainer
//! checks before every step that it still holds the job and whether a cancel was asked
//! for (so a cancel takes effect within a step), and trains only while it holds the run
//! directory's lock: one stalled past its lease stops at its next step, and its
//! successor waits for the lock, so two never write one run at once. A job of world size
//! N trains on N devices of this trainer (`--device`: CPU ranks, or GPUs 0..N).
//! [`run_job`] is one job; [`run`] is the loop around it.
#![warn(missing_docs)]

mod housekeeping;
mod metrics;
mod options;
mod run_job;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bd3lm_jobs::{Jobs, Registry};
use bd3lm_kvstore::JobStore;

pub use metrics::describe as describe_metrics;
pub use run_job::run_job;

/// Where a trainer keeps runs and publishes, and how it holds jobs.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainerSettings {
    /// Directory of the jobs' runs (`{dir}/{job}`), on storage every trainer shares: a job
    /// resumes from it on another trainer.
    #[arg(long, env = "BD3LM_RUNS_DIR", value_name = "DIR")]
    pub runs_dir: PathBuf,
    /// The model registry's storage: published versions are `{dir}/{name}/{version}`.
    #[arg(long, env = "BD3LM_REGISTRY_DIR", value_name = "DIR")]
    pub registry_dir: PathBuf,
    /// Seconds a trainer may go without touching its job before another takes it over.
    #[arg(long, env = "BD3LM_JOB_LEASE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub job_lease_secs: u64,
    /// Times a job's trainer may stop (die, hang) before the job fails instead of
    /// resuming again.
    #[arg(long, env = "BD3LM_MAX_JOB_CRASHES", default_value_t = 3)]
    pub max_job_crashes: u32,
    /// Where jobs train: the CPU, or this trainer's GPUs (one per rank of a job's
    /// world_size: cuda:0, cuda:1, ...).
    #[arg(long = "device", env = "BD3LM_TRAIN_DEVICE", value_enum, default_value_t = TrainDevice::Cpu)]
    pub device: TrainDevice,
    /// Versions of a model kept in the registry: after each publication the older ones,
    /// pinned versions excepted, are retired and their files removed. 0 keeps them all.
    #[arg(long, env = "BD3LM_KEEP_VERSIONS", default_value_t = 10)]
    pub keep_versions: u32,
}

/// Where a run's ranks train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrainDevice {
    /// Every rank on the CPU.
    Cpu,
    /// Rank r on GPU r.
    Cuda,
}

impl TrainDevice {
    /// The devices of a run of `world` ranks; an error naming what is missing when this
    /// build or machine cannot give them.
    pub fn devices(self, world: usize) -> anyhow::Result<Vec<candle_core::Device>> {
        match self {
            TrainDevice::Cpu => Ok(vec![candle_core::Device::Cpu; world]),
            TrainDevice::Cuda => (0..world)
                .map(|r| {
                    candle_core::Device::new_cuda(r).map_err(|e| {
                        anyhow::anyhow!("the run needs {world} CUDA devices; cuda:{r}: {e}")
                    })
                })
                .collect(),
        }
    }
}

impl TrainerSettings {
    /// The lease of a job.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.job_lease_secs)
    }
}

/// A trainer's handles: its id in the queue, the jobs, the registry, its settings.
#[derive(Clone)]
pub struct TrainerWorker {
    /// This trainer's name in the queue's consumer group, drawn at start.
    pub id: String,
    jobs: Jobs,
    registry: Registry,
    settings: TrainerSettings,
}

impl TrainerWorker {
    /// A trainer over `store` with `settings`.
    pub fn new(store: JobStore, settings: TrainerSettings) -> Self {
        Self {
            id: format!("trainer-{:016x}", rand::random::<u64>()),
            jobs: Jobs::new(store.clone()),
            registry: Registry::new(store, settings.registry_dir.clone()),
            settings,
        }
    }
}

/// Longest wait for a new job before an idle trainer looks again for jobs whose trainers
/// stopped (their leases lapse without a notification).
const IDLE_WAIT: Duration = Duration::from_secs(5);

/// Pause after a failed read of the queue (the store unreachable).
const RETRY: Duration = Duration::from_millis(500);

/// Takes and trains jobs until `shutdown` resolves; a job in progress then stops at its
/// next step and is handed back, to be resumed at once by another trainer (a stop that
/// does not count against the job's crashes).
pub async fn run(trainer: TrainerWorker, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    housekeeping::spawn(trainer.clone());
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tracing::info!(trainer = %trainer.id, "trainer waiting for jobs");
    loop {
        let lease = trainer.settings.lease();
        let claimed = tokio::select! {
            _ = &mut shutdown => break,
            c = trainer.jobs.wait_for(&trainer.id, lease, IDLE_WAIT.min(lease)) => c,
        };
        match claimed {
            Ok(Some(claim)) => {
                let job = run_job(&trainer, claim, stopped.clone());
                tokio::pin!(job);
                tokio::select! {
                    _ = &mut job => continue,
                    _ = &mut shutdown => {
                        let _ = stop.send(true);
                        job.await;
                        break;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading the job queue failed");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
    tracing::info!(trainer = %trainer.id, "trainer stopped");
}
