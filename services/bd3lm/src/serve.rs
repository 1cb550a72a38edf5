//! `bd3lm serve`: the whole system in one process: a coordinator and N denoise workers
//! talking gRPC over loopback, with the in-memory store (or Redis).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use bd3lm_coordinator::{CoordinatorSettings, Pool, WorkerSource};
use bd3lm_kvstore::StoreArgs;
use bd3lm_proto::auth::{Bearer, Tokens};
use bd3lm_proto::tls::TlsFiles;
use bd3lm_telemetry::metrics::MetricsArgs;
use bd3lm_telemetry::probes::{HealthArgs, Ports};
use bd3lm_worker::{DeviceArgs, WorkerSettings};
use clap::Args;

/// Arguments of `bd3lm serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the public Generation service.
    #[arg(long, env = "BD3LM_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Denoise workers to run in this process.
    #[arg(long, env = "BD3LM_SERVE_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: u16,
    /// Checkpoint directory; default: the bundled demo model.
    #[arg(long, env = "BD3LM_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,
    /// Directory of the built-in trainer's runs (`runs/`) and of the model registry
    /// (`registry/`); default: a temporary directory removed at exit.
    #[arg(long, env = "BD3LM_TRAINING_DIR", value_name = "DIR")]
    pub training_dir: Option<PathBuf>,
    /// TLS on the public port (the workers inside stay on loopback).
    #[command(flatten)]
    pub tls: TlsFiles,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub worker: WorkerSettings,
    #[command(flatten)]
    pub coordinator: CoordinatorSettings,
    #[command(flatten)]
    pub drain: bd3lm_telemetry::shutdown::DrainArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    #[command(flatten)]
    pub health: HealthArgs,
}

/// Runs until interrupted.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    args.metrics.install()?;
    bd3lm_coordinator::metrics::describe();
    bd3lm_worker::metrics::describe();
    bd3lm_kvstore::metrics::describe();
    bd3lm_trainer::describe_metrics();
    let store = args.store.open()?;
    let checkpoint = crate::demo::checkpoint_or_demo(args.checkpoint.as_deref())?;
    let (device, dtype) = (args.device.device()?, args.device.dtype());
    let dir = checkpoint.clone();
    let model = tokio::task::spawn_blocking(move || bd3lm_worker::load(&dir, None, dtype, &device))
        .await??;
    let models = Arc::new(bd3lm_worker::Models::fixed(Arc::new(model)));
    // The workers listen on loopback ports any local user reaches: they take calls
    // carrying this process's own token only.
    let token = format!("{:032x}", rand::random::<u128>());
    let internal = Arc::new(Tokens::of(vec![token.clone()]));
    let mut addrs = Vec::new();
    for _ in 0..args.workers {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?.to_string());
        let (models, store, internal) = (models.clone(), store.clone(), internal.clone());
        let limits = args.worker.limits(args.device.device);
        tokio::spawn(async move {
            let never = std::future::pending();
            let ports = Ports::plain(listener);
            let serving = bd3lm_worker::serve(ports, models, store, limits, internal, never);
            if let Err(e) = serving.await {
                tracing::error!(error = %e, "worker stopped");
            }
        });
    }
    let mut settings = args.coordinator;
    if settings.tokenizer.is_none() {
        settings.tokenizer = crate::demo::tokenizer_of(&checkpoint, None);
    }
    let pool = Pool::new(
        settings.routing,
        settings.affinity_sessions as usize,
        settings.down_after_failures,
    );
    let pool = Arc::new(pool.with_bearer(Bearer::new(Some(&token))?));
    let source = WorkerSource::Static(addrs);
    pool.refresh(&source).await;
    bd3lm_coordinator::spawn_discovery(pool.clone(), source, settings.health_interval);
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    println!(
        "bd3lm serve listening on {} ({} workers, store {})",
        listener.local_addr()?,
        args.workers,
        args.store.describe()
    );
    let ports = Ports {
        grpc: listener,
        tls: args.tls.server()?,
        health: args.health.bind().await?,
    };
    let _training = spawn_trainer(args.training_dir.as_deref(), &store)?;
    let signal = bd3lm_telemetry::shutdown::signal();
    bd3lm_telemetry::shutdown::drained(signal, args.drain.drain, |stop| {
        bd3lm_coordinator::serve(ports, pool, store, settings, stop)
    })
    .await
}

/// Starts one trainer over `store`, with its runs and registry under `dir` (a temporary
/// directory, returned to be kept until exit, when none is given).
fn spawn_trainer(
    dir: Option<&std::path::Path>,
    store: &bd3lm_kvstore::Store,
) -> anyhow::Result<Option<tempfile::TempDir>> {
    let temporary = match dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("bd3lm-training-")
                .tempdir()?,
        ),
    };
    let dir = dir
        .or(temporary.as_ref().map(|t| t.path()))
        .expect("one of them is set");
    let settings = bd3lm_trainer::TrainerSettings {
        runs_dir: dir.join("runs"),
        registry_dir: dir.join("registry"),
        job_lease_secs: 30,
        max_job_crashes: 3,
    };
    for d in [&settings.runs_dir, &settings.registry_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    tracing::info!(dir = %dir.display(), "training jobs run here");
    let trainer = bd3lm_trainer::TrainerWorker::new(store.clone(), settings);
    tokio::spawn(bd3lm_trainer::run(trainer, std::future::pending()));
    Ok(temporary)
}
