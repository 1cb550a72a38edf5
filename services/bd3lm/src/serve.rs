//! `bd3lm serve`: the whole system in one process: a coordinator and N denoise workers
//! talking gRPC over loopback, with the in-memory store (or Redis).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use bd3lm_coordinator::{CoordinatorSettings, Pool, Routing, WorkerSource};
use bd3lm_kvstore::{Store, StoreConfig};
use candle_core::{DType, Device};
use clap::Args;

/// Arguments of `bd3lm serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address of the public Generation service.
    #[arg(long, env = "BD3LM_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// Denoise workers to run in this process.
    #[arg(long, env = "BD3LM_WORKERS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: u16,
    /// Redis URL; default: the in-memory store.
    #[arg(long, env = "BD3LM_REDIS_URL")]
    pub redis: Option<String>,
    /// Checkpoint directory; default: the bundled demo model.
    #[arg(long, env = "BD3LM_CHECKPOINT")]
    pub checkpoint: Option<PathBuf>,
    /// tokenizer.json; default: the checkpoint directory's, when present.
    #[arg(long, env = "BD3LM_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// Blocks each worker denoises at once.
    #[arg(long, env = "BD3LM_WORKER_CAPACITY", default_value_t = 1)]
    pub capacity: usize,
}

/// Runs until interrupted.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = StoreConfig::default();
    let store = match &args.redis {
        Some(url) => Store::redis(url, config)?,
        None => Store::memory(config),
    };
    let loaded = Arc::new(OnceLock::new());
    let checkpoint = crate::demo::checkpoint_or_demo(args.checkpoint.as_deref())?;
    let tokenizer = crate::demo::tokenizer_of(&checkpoint, args.tokenizer.as_deref());
    let dir = checkpoint.clone();
    let model = tokio::task::spawn_blocking(move || {
        bd3lm_worker::load(&dir, None, DType::F32, &Device::Cpu)
    })
    .await??;
    let _ = loaded.set(Arc::new(model));
    let mut addrs = Vec::new();
    for _ in 0..args.workers {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?.to_string());
        let (loaded, store) = (loaded.clone(), store.clone());
        tokio::spawn(async move {
            if let Err(e) = bd3lm_worker::serve(
                listener,
                loaded,
                store,
                args.capacity,
                1 << 30,
                std::future::pending(),
            )
            .await
            {
                tracing::error!(error = %e, "worker stopped");
            }
        });
    }
    let pool = Arc::new(Pool::new(Routing::Affinity));
    let source = WorkerSource::Static(addrs);
    pool.refresh(&source).await;
    bd3lm_coordinator::spawn_discovery(pool.clone(), source, Duration::from_secs(1));
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let store_name = args.redis.as_deref().unwrap_or("memory");
    println!(
        "bd3lm serve listening on {} ({} workers, store {store_name})",
        listener.local_addr()?,
        args.workers
    );
    let settings = CoordinatorSettings {
        tokenizer,
        ..CoordinatorSettings::default()
    };
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    bd3lm_coordinator::serve(listener, pool, store, settings, shutdown).await
}
