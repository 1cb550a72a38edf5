//! One trainer on the in-memory store: jobs run to a published version, stop for a
//! cancel within a step, fail after too many crashes, and stop when another trainer takes
//! them over.

use std::path::Path;
use std::time::Duration;

use bd3lm_jobs::{Job, JobSpec, JobState, Jobs, Registry};
use bd3lm_kvstore::{JobStore, StoreConfig};
use bd3lm_proto::v1 as wire;
use bd3lm_training::test_util::{counting_docs, shards};
use tokio::sync::watch;

use crate::{TrainerSettings, TrainerWorker, run_job};

struct Setup {
    dir: tempfile::TempDir,
    trainer: TrainerWorker,
    jobs: Jobs,
    data: std::path::PathBuf,
}

fn setup(max_job_crashes: u32) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
    let store = JobStore::memory(StoreConfig::default());
    let settings = TrainerSettings {
        runs_dir: dir.path().join("runs"),
        registry_dir: dir.path().join("registry"),
        job_lease_secs: 30,
        max_job_crashes,
        device: crate::TrainDevice::Cpu,
        keep_versions: 0,
    };
    Setup {
        trainer: TrainerWorker::new(store.clone(), settings),
        jobs: Jobs::new(store),
        data,
        dir,
    }
}

async fn submit(s: &Setup, steps: u64) -> Job {
    let spec = wire::JobSpec {
        data: s.data.display().to_string(),
        init: Some(wire::job_spec::Init::Shape(wire::ModelShape {
            hidden_dim: 32,
            n_heads: 2,
            n_blocks: 2,
            cond_dim: 16,
        })),
        steps,
        batch_size: Some(4),
        val_batches: Some(2),
        save_every: Some(4),
        publish_as: "tiny".into(),
        ..Default::default()
    };
    let registry = Registry::records(s.jobs.store().clone());
    let spec = JobSpec::validate(spec, s.dir.path(), &registry)
        .await
        .unwrap();
    s.jobs.submit(spec, None).await.unwrap()
}

async fn run_next(s: &Setup) {
    let lease = s.trainer.settings.lease();
    let claim = s.jobs.claim(&s.trainer.id, lease).await.unwrap().unwrap();
    let (_stop, stopped) = watch::channel(false);
    run_job(&s.trainer, claim, stopped).await;
}

fn train_lines(run: &Path) -> usize {
    let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    log.lines().filter(|l| l.contains("\"train\"")).count()
}

/// A job trains to its last step, publishes version 1 and succeeds; its record shows the
/// progress and the version, the registry the version.
#[tokio::test]
async fn a_job_trains_publishes_and_succeeds() {
    let s = setup(3);
    let job = submit(&s, 6).await;
    run_next(&s).await;
    let done = s.jobs.get(&job.id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{}", done.error);
    assert_eq!((done.published.clone(), done.attempts), (vec![1], 1));
    assert_eq!(done.progress.step, 6);
    assert!(done.progress.validation.is_some());
    let versions = s.trainer.registry.versions("tiny").await.unwrap();
    assert_eq!(
        (versions[0].job_id.as_str(), versions[0].step),
        (job.id.as_str(), 6)
    );
    assert!(
        s.trainer
            .registry
            .path("tiny", 1)
            .unwrap()
            .join("config.json")
            .is_file()
    );
    assert_eq!(train_lines(&s.trainer.settings.runs_dir.join(&job.id)), 6);
    let empty = s.jobs.claim("other", Duration::ZERO).await.unwrap();
    assert_eq!(empty, None, "the finished job left the queue");
}

/// A cancel of a running job stops it at its next step; a queued one never starts.
#[tokio::test]
async fn cancels_stop_running_and_queued_jobs() {
    let s = setup(3);
    let running = submit(&s, 10_000).await;
    let queued = submit(&s, 10).await;
    let jobs = s.jobs.clone();
    let id = running.id.clone();
    let canceller = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let job = jobs.get(&id).await.unwrap().unwrap();
            if job.progress.step >= 2 {
                jobs.cancel(&id, None).await.unwrap();
                return job.progress.step;
            }
        }
    });
    run_next(&s).await;
    let asked_at = canceller.await.unwrap();
    let cancelled = s.jobs.get(&running.id).await.unwrap().unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(
        cancelled.progress.step <= asked_at + 2,
        "{asked_at} -> {:?}",
        cancelled.progress
    );
    assert!(cancelled.published.is_empty());

    s.jobs.cancel(&queued.id, None).await.unwrap();
    run_next(&s).await;
    let never = s.jobs.get(&queued.id).await.unwrap().unwrap();
    assert_eq!((never.state, never.progress.step), (JobState::Cancelled, 0));
    assert!(!s.trainer.settings.runs_dir.join(&queued.id).exists());
}

/// A job whose trainers keep dying (their claims lapse untouched) fails with the reason
/// once it has crashed more than allowed.
#[tokio::test]
async fn a_job_that_keeps_crashing_fails() {
    let s = setup(2);
    let job = submit(&s, 6).await;
    for dead in ["t1", "t2", "t3"] {
        s.jobs.claim(dead, Duration::ZERO).await.unwrap().unwrap();
    }
    // The fourth delivery: three trainers stopped before it.
    let claim = s
        .jobs
        .claim(&s.trainer.id, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.deliveries, 4);
    let (_stop, stopped) = watch::channel(false);
    run_job(&s.trainer, claim, stopped).await;
    let failed = s.jobs.get(&job.id).await.unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed);
    assert!(failed.error.contains("stopped 3 times"), "{}", failed.error);
}

/// A trainer whose claim another trainer took over stops before its first step is
/// logged, and writes no result.
#[tokio::test]
async fn a_trainer_that_lost_its_job_stops() {
    let s = setup(3);
    let job = submit(&s, 6).await;
    let mine = s
        .jobs
        .claim(&s.trainer.id, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    let theirs = s
        .jobs
        .claim("other", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(theirs.entry, mine.entry);
    let (_stop, stopped) = watch::channel(false);
    run_job(&s.trainer, mine, stopped).await;
    let record = s.jobs.get(&job.id).await.unwrap().unwrap();
    assert_eq!(
        (record.state, record.published.len()),
        (JobState::Running, 0)
    );
    assert_eq!(train_lines(&s.trainer.settings.runs_dir.join(&job.id)), 0);
    assert!(
        s.jobs.store().touch_job(&theirs, "other").await.unwrap(),
        "still theirs"
    );
}

/// A rolling restart: the job's trainer is stopped gracefully three times mid-run, and
/// each time the next trainer takes the job at once (no lease to wait out) and resumes it;
/// none of the stops counts as a crash, so a job allowed none still succeeds.
#[tokio::test]
async fn a_job_survives_a_rolling_restart_of_its_trainers() {
    let s = setup(0);
    let job = submit(&s, 16).await;
    let lease = s.trainer.settings.lease();
    for restart in 0..3 {
        let claim = s.jobs.claim(&s.trainer.id, lease).await.unwrap();
        let claim =
            claim.unwrap_or_else(|| panic!("restart {restart}: the job was not handed back"));
        assert_eq!(
            claim.deliveries, 1,
            "restart {restart}: a graceful stop counted"
        );
        let (stop, stopped) = watch::channel(false);
        let (jobs, id) = (s.jobs.clone(), job.id.clone());
        let from = s.jobs.get(&job.id).await.unwrap().unwrap().progress.step;
        let stopper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let step = jobs.get(&id).await.unwrap().unwrap().progress.step;
                if step > from {
                    let _ = stop.send(true);
                    return;
                }
            }
        });
        run_job(&s.trainer, claim, stopped).await;
        stopper.await.unwrap();
        let record = s.jobs.get(&job.id).await.unwrap().unwrap();
        assert_eq!(record.state, JobState::Running, "restart {restart}");
    }
    run_next(&s).await;
    let done = s.jobs.get(&job.id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{}", done.error);
    assert_eq!(done.progress.step, 16);
}

/// With `--keep-versions 1`, each publication retires the older versions but the pinned;
/// a sweep then removes the retired versions' files and the run of a deleted job, and
/// leaves the rest.
#[tokio::test]
async fn older_versions_and_deleted_runs_are_swept() {
    let mut s = setup(3);
    s.trainer.settings.keep_versions = 1;
    let first = submit(&s, 4).await;
    run_next(&s).await;
    assert!(
        s.jobs
            .store()
            .pin_model_version("tiny", 1, true)
            .await
            .unwrap()
    );
    for _ in 0..2 {
        submit(&s, 4).await;
        run_next(&s).await;
    }
    let kept: Vec<u64> = s
        .trainer
        .registry
        .versions("tiny")
        .await
        .unwrap()
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(kept, vec![1, 3], "2 retired, the pinned 1 kept");
    let path = |v| s.trainer.registry.path("tiny", v).unwrap();
    assert!(path(2).is_dir(), "files go at the sweep");

    s.jobs.delete(&first.id, None).await.unwrap();
    s.trainer.settings.job_lease_secs = 0;
    crate::housekeeping::sweep(&s.trainer).await;
    assert!(!path(2).exists() && path(1).is_dir() && path(3).is_dir());
    assert!(
        s.jobs
            .store()
            .retired_model_versions()
            .await
            .unwrap()
            .is_empty()
    );
    let runs: Vec<_> = std::fs::read_dir(&s.trainer.settings.runs_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(!s.trainer.settings.runs_dir.join(&first.id).exists());
}
