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
    /// Denoise workers to run in this process, per model served.
    #[arg(long, env = "BD3LM_SERVE_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: u16,
    /// Checkpoint directory; default: the bundled demo model.
    #[arg(long, env = "BD3LM_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,
    /// Directory of the built-in trainer's runs (`runs/`) and of the model registry
    /// (`registry/`); default: a temporary directory removed at exit.
    #[arg(long, env = "BD3LM_TRAINING_DIR", value_name = "DIR")]
    pub training_dir: Option<PathBuf>,
    /// With --model NAME (repeated): workers of their own follow each registry model (in
    /// --registry-dir, default the training directory's registry/), served by name
    /// beside --checkpoint's model, which stays the default of requests naming none.
    #[command(flatten)]
    pub follow: bd3lm_worker::FollowSettings,
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
    let stores = args.store.open()?;
    bd3lm_kvstore::eviction::check(&stores.sessions).await?;
    let training = Training::open(&args)?;
    let mut settings = args.coordinator.clone();
    let (device, precision) = (args.device.device()?, args.device.precision());
    // The checkpoint (default: the demo model), the default of requests naming no model,
    // and each registry model of --model beside it.
    let checkpoint = crate::demo::checkpoint_or_demo(args.checkpoint.as_deref())?;
    let loading = (checkpoint.clone(), device.clone());
    let load = move || bd3lm_worker::load(&loading.0, None, precision, &loading.1);
    let fixed = tokio::task::spawn_blocking(load).await??;
    let id = fixed.model_id.clone();
    if settings.tokenizer.is_none()
        && let Some(tokenizer) = crate::demo::tokenizer_of(&checkpoint, None)
    {
        settings.model_tokenizers.push((id.clone(), tokenizer));
    }
    settings.default_model.get_or_insert(id);
    let mut served = vec![Arc::new(bd3lm_worker::Models::fixed(Arc::new(fixed)))];
    for name in &args.follow.model {
        let following = bd3lm_worker::models::Following {
            name: name.clone(),
            dir: training.registry.clone(),
            device: device.clone(),
            precision,
        };
        served.push(following.start(&stores.jobs, &args.follow)?);
    }
    // The workers listen on loopback ports any local user reaches: they take calls
    // carrying this process's own token only.
    let token = format!("{:032x}", rand::random::<u128>());
    let internal = Arc::new(Tokens::of(vec![token.clone()]));
    let mut addrs = Vec::new();
    for models in &served {
        for _ in 0..args.workers {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(listener.local_addr()?.to_string());
            let (models, store) = (models.clone(), stores.sessions.clone());
            let internal = internal.clone();
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
    }
    let pool = Pool::new(
        settings.routing,
        settings.affinity_sessions as usize,
        settings.down_after_failures,
    );
    let pool = Arc::new(pool.with_bearer(Bearer::new(Some(&token))?));
    let workers = addrs.len();
    let source = WorkerSource::Static(addrs);
    pool.refresh(&source).await;
    bd3lm_coordinator::spawn_discovery(pool.clone(), source, settings.health_interval);
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    println!(
        "bd3lm serve listening on {} ({} workers, store {})",
        listener.local_addr()?,
        workers,
        args.store.describe()
    );
    let ports = Ports {
        grpc: listener,
        tls: args.tls.server()?,
        https: args.tls.acceptor()?,
        health: args.health.bind().await?,
    };
    training.spawn_trainer(&stores.jobs);
    let signal = bd3lm_telemetry::shutdown::signal();
    bd3lm_telemetry::shutdown::drained(signal, args.drain.drain, |stop| {
        bd3lm_coordinator::serve(ports, pool, stores, settings, stop)
    })
    .await
}

/// Where the built-in trainer keeps its runs and publishes.
struct Training {
    runs: PathBuf,
    registry: PathBuf,
    /// The temporary directory holding them when no --training-dir was given, removed
    /// when this goes.
    _temporary: Option<tempfile::TempDir>,
}

impl Training {
    /// `--training-dir`'s runs/ and registry/ (the registry `--registry-dir` when set),
    /// created; under a fresh temporary directory without it.
    fn open(args: &ServeArgs) -> anyhow::Result<Self> {
        let temporary = match &args.training_dir {
            Some(_) => None,
            None => Some(
                tempfile::Builder::new()
                    .prefix("bd3lm-training-")
                    .tempdir()?,
            ),
        };
        let dir = match (&args.training_dir, &temporary) {
            (Some(dir), _) => dir.clone(),
            (None, t) => t.as_ref().expect("made above").path().to_path_buf(),
        };
        let registry = args
            .follow
            .registry_dir
            .clone()
            .unwrap_or(dir.join("registry"));
        let runs = dir.join("runs");
        for d in [&runs, &registry] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        tracing::info!(dir = %dir.display(), "training jobs run here");
        Ok(Self {
            runs,
            registry,
            _temporary: temporary,
        })
    }

    /// Starts one trainer over `store`.
    fn spawn_trainer(&self, store: &bd3lm_kvstore::JobStore) {
        let settings = bd3lm_trainer::TrainerSettings {
            runs_dir: self.runs.clone(),
            registry_dir: self.registry.clone(),
            job_lease_secs: 30,
            max_job_crashes: 3,
            device: bd3lm_trainer::TrainDevice::Cpu,
            keep_versions: 10,
        };
        let trainer = bd3lm_trainer::TrainerWorker::new(store.clone(), settings);
        tokio::spawn(bd3lm_trainer::run(trainer, std::future::pending()));
    }
}
