//! `bd3lm-trainer`: a trainer worker for deployment. Every setting is a flag or an
//! environment variable.

use std::process::ExitCode;

use bd3lm_server::ServiceArgs;
use bd3lm_trainer::{TrainerSettings, TrainerWorker};
use clap::Parser;

/// A BD3-LM trainer worker: takes training jobs from the store's queue.
#[derive(Debug, Parser)]
#[command(name = "bd3lm-trainer", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
    #[command(flatten)]
    trainer: TrainerSettings,
}

fn main() -> ExitCode {
    // SAFETY: the process has one thread; the runtime's start in `run_service`.
    unsafe { bd3lm_model::set_host_threads(None, bd3lm_model::Workload::Training) };
    bd3lm_telemetry::run_service("bd3lm-trainer", run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let store = args
        .service
        .start(bd3lm_trainer::describe_metrics)
        .await?
        .jobs;
    for dir in [&args.trainer.runs_dir, &args.trainer.registry_dir] {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
    }
    let trainer = TrainerWorker::new(store, args.trainer);
    println!("bd3lm-trainer {} listening for jobs", trainer.id);
    bd3lm_trainer::run(trainer, bd3lm_telemetry::shutdown::signal()).await;
    Ok(())
}
