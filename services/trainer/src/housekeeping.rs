//! What the trainers, the writers of the shared storage, remove from it: the files of
//! retired model versions, and the run directories of jobs whose records are gone
//! (deleted with DeleteJob, or by the coordinators' `--job-retention-secs` sweep). One
//! sweep every lease, beside whatever job the trainer runs; sweeps of several trainers
//! at once are harmless (a removal that finds nothing is done).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::TrainerWorker;

const RUNS_REMOVED: &str = "bd3lm_training_runs_removed_total";

/// Describes the sweep's metrics to the installed recorder.
pub(crate) fn describe() {
    metrics::describe_counter!(
        RUNS_REMOVED,
        "Run directories a trainer removed because their job's record is gone"
    );
}

/// Sweeps every lease for as long as the process runs.
pub(crate) fn spawn(trainer: TrainerWorker) {
    tokio::spawn(async move {
        let every = trainer.settings.lease();
        loop {
            tokio::time::sleep(every).await;
            sweep(&trainer).await;
        }
    });
}

/// One sweep; failures are logged and tried again at the next.
pub(crate) async fn sweep(trainer: &TrainerWorker) {
    match trainer.registry.remove_retired().await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "files of retired model versions removed"),
        Err(e) => tracing::warn!(error = %e, "removing retired model versions failed"),
    }
    match remove_orphan_runs(trainer).await {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "run directories of deleted jobs removed"),
        Err(e) => tracing::warn!(error = %e, "removing the runs of deleted jobs failed"),
    }
}

/// Removes the run directories whose job has no record, left untouched for a lease at
/// least (so a run is never taken from under a trainer that just made it): how many.
async fn remove_orphan_runs(trainer: &TrainerWorker) -> anyhow::Result<usize> {
    let (runs, quiet) = (trainer.settings.runs_dir.clone(), trainer.settings.lease());
    let candidates = tokio::task::spawn_blocking(move || quiet_runs(&runs, quiet)).await??;
    let mut removed = 0;
    for (id, dir) in candidates {
        if trainer.jobs.store().get_job(&id).await?.is_some() {
            continue;
        }
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await??;
        metrics::counter!(RUNS_REMOVED).increment(1);
        removed += 1;
    }
    Ok(removed)
}

/// The run directories under `runs` (named as job ids) not modified for `quiet`.
fn quiet_runs(runs: &Path, quiet: Duration) -> std::io::Result<Vec<(String, PathBuf)>> {
    let now = SystemTime::now();
    let mut found = Vec::new();
    for entry in std::fs::read_dir(runs)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_job =
            name.len() == 32 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let meta = entry.metadata()?;
        let idle = meta
            .modified()
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|idle| idle >= quiet);
        if is_job && meta.is_dir() && idle {
            found.push((name, entry.path()));
        }
    }
    Ok(found)
}
