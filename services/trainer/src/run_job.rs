//! One job on one trainer: checks before starting, the training on a blocking thread with
//! a check before every step, progress into the job record, publication, and the end.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use bd3lm_jobs::registry::Figures;
use bd3lm_jobs::{Job, JobState, ModelVersion};
use bd3lm_kvstore::JobClaim;
use bd3lm_kvstore::record::short_id;
use bd3lm_training::trainer::{CHECKPOINT_DIR, RESUME_DIR};
use bd3lm_training::{Event, StepStats, Trainer, ValStats};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::{TrainerWorker, metrics, options};

/// Why a run stopped before its end.
#[derive(Default)]
struct Flags {
    /// Another trainer holds the job now: write nothing more.
    lost: AtomicBool,
    /// A cancel was asked for.
    cancel: AtomicBool,
    /// This trainer is shutting down.
    shutdown: AtomicBool,
}

impl Flags {
    fn stopping(&self) -> bool {
        [&self.lost, &self.cancel, &self.shutdown]
            .iter()
            .any(|f| f.load(Ordering::Relaxed))
    }
}

/// What the training thread reports, in order.
enum Report {
    Step(StepStats, f64),
    Validation(ValStats),
    Published(u64),
}

/// How a run ended.
enum Trained {
    /// The last step was reached and the result published as this version.
    Completed(u64),
    /// Stopped early: see the [`Flags`].
    Stopped,
}

/// A run that failed: why, and whether another attempt may succeed (the store was
/// unreachable) rather than fail the job.
struct Failure {
    reason: String,
    retry: bool,
}

impl From<bd3lm_jobs::Error> for Failure {
    fn from(e: bd3lm_jobs::Error) -> Self {
        let retry = matches!(e, bd3lm_jobs::Error::Store(_));
        Self {
            reason: e.to_string(),
            retry,
        }
    }
}

impl From<bd3lm_training::Error> for Failure {
    fn from(e: bd3lm_training::Error) -> Self {
        Self {
            reason: e.to_string(),
            retry: false,
        }
    }
}

/// Whether the queue entry is done with.
enum Ended {
    /// The job ended (or has no record): remove its entry.
    Finished,
    /// Leave the entry: another trainer holds it, or takes it once its lease lapses.
    Released,
    /// Hand the entry back now (this trainer is shutting down): the next trainer takes it
    /// at once, and this stop is not counted as a crash.
    HandedBack,
}

/// Runs the claimed job to its end, or until `shutdown` turns true, another trainer takes
/// it over, or it is cancelled.
pub async fn run_job(trainer: &TrainerWorker, claim: JobClaim, shutdown: watch::Receiver<bool>) {
    let span = tracing::info_span!(
        "job",
        job = short_id(&claim.job_id),
        attempt = claim.deliveries
    );
    async {
        let ended = attempt(trainer, &claim, shutdown).await;
        let finished = match ended {
            Ok(Ended::Finished) => trainer.jobs.store().finish_job(&claim).await,
            Ok(Ended::Released) => Ok(()),
            Ok(Ended::HandedBack) => {
                let store = trainer.jobs.store();
                store.release_job(&claim, &trainer.id).await.map(|_| ())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = finished {
            tracing::warn!(error = %e, "the store failed; the job is taken again after its lease");
        }
    }
    .instrument(span)
    .await
}

async fn attempt(
    trainer: &TrainerWorker,
    claim: &JobClaim,
    shutdown: watch::Receiver<bool>,
) -> Result<Ended, bd3lm_kvstore::Error> {
    let jobs = &trainer.jobs;
    let Some(job) = jobs.get(&claim.job_id).await.map_err(store_error)? else {
        return Ok(Ended::Finished);
    };
    let crashes = claim.deliveries.saturating_sub(1);
    let end = if job.state.is_terminal() {
        Some((job.state, String::new()))
    } else if job.cancel_requested {
        Some((JobState::Cancelled, String::new()))
    } else if crashes > u64::from(trainer.settings.max_job_crashes) {
        let reason = format!(
            "its trainers stopped {crashes} times before it finished (the run directory keeps the last save)"
        );
        Some((JobState::Failed, reason))
    } else {
        None
    };
    if let Some((state, reason)) = end {
        if !job.state.is_terminal() {
            conclude(trainer, &job.id, state, reason, None).await?;
        }
        return Ok(Ended::Finished);
    }
    let job = jobs
        .update(&job.id, |j| {
            j.state = JobState::Running;
            j.attempts = claim.deliveries as u32;
        })
        .await
        .map_err(store_error)?;
    tracing::info!(steps = job.spec.recipe.steps, "training");
    let flags = Arc::new(Flags::default());
    let heartbeat = tokio::spawn(heartbeat(
        trainer.clone(),
        claim.clone(),
        flags.clone(),
        shutdown,
    ));
    let (tx, rx) = mpsc::unbounded_channel();
    let context = (trainer.clone(), claim.clone(), job.clone(), flags.clone());
    let handle = Handle::current();
    let training = tokio::task::spawn_blocking(move || {
        let (trainer, claim, job, flags) = context;
        train(&trainer, &claim, &job, &flags, &tx, &handle)
    });
    let (trained, ()) = tokio::join!(training, report(trainer, &job, rx, &flags));
    heartbeat.abort();
    let trained = trained.unwrap_or_else(|e| {
        Err(Failure {
            reason: format!("the training thread stopped: {e}"),
            retry: false,
        })
    });
    settle(trainer, &job, trained, &flags).await
}

/// Records how the run ended; whether the entry is done with.
async fn settle(
    trainer: &TrainerWorker,
    job: &Job,
    trained: Result<Trained, Failure>,
    flags: &Flags,
) -> Result<Ended, bd3lm_kvstore::Error> {
    match trained {
        Ok(Trained::Completed(version)) => {
            conclude(
                trainer,
                &job.id,
                JobState::Succeeded,
                String::new(),
                Some(version),
            )
            .await?;
            Ok(Ended::Finished)
        }
        Ok(Trained::Stopped) if flags.lost.load(Ordering::Relaxed) => {
            tracing::warn!("another trainer took the job over; this one stopped");
            metrics::ended("lost");
            Ok(Ended::Released)
        }
        Ok(Trained::Stopped) if flags.cancel.load(Ordering::Relaxed) => {
            conclude(trainer, &job.id, JobState::Cancelled, String::new(), None).await?;
            Ok(Ended::Finished)
        }
        Ok(Trained::Stopped) => {
            tracing::info!("stopped for shutdown; the job is handed back for another trainer");
            metrics::ended("released");
            Ok(Ended::HandedBack)
        }
        Err(f) if f.retry => {
            tracing::warn!(reason = %f.reason, "the run stopped; the job is taken again after its lease");
            metrics::ended("released");
            Ok(Ended::Released)
        }
        Err(f) => {
            tracing::error!(reason = %f.reason, "the job failed");
            conclude(trainer, &job.id, JobState::Failed, f.reason, None).await?;
            Ok(Ended::Finished)
        }
    }
}

/// Ends the job in `state` (with `reason` for a failure, and a published version).
async fn conclude(
    trainer: &TrainerWorker,
    id: &str,
    state: JobState,
    reason: String,
    version: Option<u64>,
) -> Result<(), bd3lm_kvstore::Error> {
    trainer
        .jobs
        .update(id, |j| {
            j.state = state;
            j.error = reason.clone();
            if let Some(v) = version.filter(|v| !j.published.contains(v)) {
                j.published.push(v);
            }
        })
        .await
        .map_err(store_error)?;
    let outcome = match state {
        JobState::Succeeded => "succeeded",
        JobState::Cancelled => "cancelled",
        _ => "failed",
    };
    tracing::info!(outcome, "job ended");
    metrics::ended(outcome);
    Ok(())
}

fn store_error(e: bd3lm_jobs::Error) -> bd3lm_kvstore::Error {
    match e {
        bd3lm_jobs::Error::Store(e) => e,
        other => bd3lm_kvstore::Error::Corrupt(other.to_string()),
    }
}

/// Keeps the claim while steps are long (validations, saves), and notices a lost claim,
/// a cancel or a shutdown between steps' own checks.
async fn heartbeat(
    trainer: TrainerWorker,
    claim: JobClaim,
    flags: Arc<Flags>,
    mut shutdown: watch::Receiver<bool>,
) {
    let every = trainer.settings.lease() / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|stop| *stop) => {
                flags.shutdown.store(true, Ordering::Relaxed);
                return;
            }
        }
        check(&trainer, &claim, &flags).await;
    }
}

/// Touches the claim and reads the cancel flag, setting `flags` accordingly. A store that
/// does not answer changes nothing: the lease covers short outages.
async fn check(trainer: &TrainerWorker, claim: &JobClaim, flags: &Flags) {
    let store = trainer.jobs.store();
    if let Ok(false) = store.touch_job(claim, &trainer.id).await {
        flags.lost.store(true, Ordering::Relaxed);
    }
    if let Ok(Some(job)) = trainer.jobs.get(&claim.job_id).await
        && job.cancel_requested
    {
        flags.cancel.store(true, Ordering::Relaxed);
    }
}

/// Writes the training thread's reports into the job record until it ends.
async fn report(
    trainer: &TrainerWorker,
    job: &Job,
    mut rx: mpsc::UnboundedReceiver<Report>,
    flags: &Flags,
) {
    while let Some(first) = rx.recv().await {
        // Steps come faster than records need to change: only the latest step counts.
        let mut batch = vec![first];
        while let Ok(next) = rx.try_recv() {
            batch.push(next);
        }
        if flags.lost.load(Ordering::Relaxed) {
            continue;
        }
        let written = trainer
            .jobs
            .update(&job.id, |j| {
                for r in &batch {
                    apply(j, r);
                }
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "recording the job's progress failed");
        }
    }
}

fn apply(job: &mut Job, report: &Report) {
    let p = &mut job.progress;
    match report {
        Report::Step(s, eta) => {
            p.step = s.step;
            p.loss = s.loss;
            p.tokens_per_s = s.tokens_per_s;
            p.tokens = s.tokens;
            p.eta_s = *eta;
        }
        Report::Validation(v) => p.validation = Some((v.step, v.nll, v.ppl)),
        Report::Published(v) if !job.published.contains(v) => job.published.push(*v),
        Report::Published(_) => {}
    }
}

/// Trains the job in its run directory (resuming the last save if there is one) and
/// publishes the result; runs on a blocking thread.
fn train(
    trainer: &TrainerWorker,
    claim: &JobClaim,
    job: &Job,
    flags: &Flags,
    tx: &mpsc::UnboundedSender<Report>,
    handle: &Handle,
) -> Result<Trained, Failure> {
    bd3lm_training::retain_freed_memory();
    let run = trainer.settings.runs_dir.join(&job.id);
    let Some(_lock) = lock_run(&run, flags)? else {
        return Ok(Trained::Stopped);
    };
    let spec = &job.spec;
    let devices = trainer
        .settings
        .device
        .devices(spec.recipe.world_size as usize)
        .map_err(|e| Failure {
            reason: e.to_string(),
            retry: false,
        })?;
    let mut run_trainer = if run.join(RESUME_DIR).is_dir() {
        Trainer::resume_on(&run, None, &devices)?
    } else {
        let init = options::train_init(spec, &trainer.registry)?;
        Trainer::new_on(&run, options::train_options(spec), init, &devices)?
    };
    let (first, started) = (run_trainer.step(), Instant::now());
    tracing::info!(from_step = first, "run opened");
    let mut figures = Figures::default();
    let mut failure = None;
    let completed = run_trainer.run_until(|event| {
        match event {
            Event::Step(s) => {
                if flags.stopping() {
                    return ControlFlow::Break(());
                }
                handle.block_on(check(trainer, claim, flags));
                if flags.stopping() {
                    return ControlFlow::Break(());
                }
                (figures.step, figures.tokens) = (s.step, s.tokens);
                let per_step = started.elapsed().as_secs_f64() / (s.step - first) as f64;
                let _ = tx.send(Report::Step(
                    *s,
                    per_step * (spec.recipe.steps - s.step) as f64,
                ));
            }
            Event::Validation(v) => {
                figures.validation = Some((v.nll, v.ppl));
                let _ = tx.send(Report::Validation(*v));
            }
            Event::Saved(dir) if spec.publish_each_save => {
                match handle.block_on(publish(trainer, job, dir, figures)) {
                    Ok(v) => {
                        let _ = tx.send(Report::Published(v.version));
                    }
                    Err(e) => {
                        failure = Some(e);
                        return ControlFlow::Break(());
                    }
                }
            }
            Event::Saved(_) => {}
        }
        ControlFlow::Continue(())
    })?;
    if let Some(f) = failure {
        return Err(f.into());
    }
    if !completed {
        return Ok(Trained::Stopped);
    }
    // A run resumed at its end (its trainer stopped while publishing) has no events.
    if figures.step == 0 {
        figures.step = run_trainer.step();
        figures.tokens = run_trainer.step() * run_trainer.tokens_per_step();
    }
    let checkpoint = run.join(CHECKPOINT_DIR);
    let version = handle.block_on(publish(trainer, job, &checkpoint, figures))?;
    Ok(Trained::Completed(version.version))
}

/// Publishes the checkpoint in `dir` under the job's name, once per job and step: a
/// trainer that resumes a job whose last trainer published and then stopped finds that
/// version instead of publishing a twin.
async fn publish(
    trainer: &TrainerWorker,
    job: &Job,
    dir: &std::path::Path,
    figures: Figures,
) -> Result<ModelVersion, bd3lm_jobs::Error> {
    let name = &job.spec.publish_as;
    let published = trainer.registry.versions(name).await?;
    if let Some(v) = published
        .into_iter()
        .find(|v| v.job_id == job.id && v.step == figures.step)
    {
        return Ok(v);
    }
    let version = trainer
        .registry
        .publish(dir, name, &job.id, figures)
        .await?;
    let keep = trainer.settings.keep_versions as usize;
    // The version is published: a failure of the policy is logged, not the job's.
    if keep > 0
        && let Err(e) = trainer.registry.keep_newest(name, keep).await
    {
        tracing::warn!(error = %e, "retiring older model versions failed");
    }
    Ok(version)
}

/// Takes the run directory's lock, waiting while another trainer holds it: one whose
/// claim lapsed (stopped, or cut off from the store) keeps writing until it notices, and
/// the lock keeps the two from ever writing at once. A trainer that dies drops its lock
/// with its process. `None` when the run is to stop meanwhile.
fn lock_run(run: &std::path::Path, flags: &Flags) -> Result<Option<std::fs::File>, Failure> {
    let io = |e: std::io::Error| Failure {
        reason: format!("{}: {e}", run.display()),
        retry: false,
    };
    std::fs::create_dir_all(run).map_err(io)?;
    let file = std::fs::File::create(run.join(".lock")).map_err(io)?;
    let mut waited = false;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        if flags.stopping() {
            return Ok(None);
        }
        if !waited {
            tracing::info!("waiting for the job's previous trainer to let go of its run");
            waited = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
