//! `bd3lm-worker`: a denoise worker for deployment. Every setting is a flag or an
//! environment variable.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use bd3lm_kvstore::{Store, StoreConfig};
use candle_core::{DType, Device};
use clap::Parser;

/// A BD3-LM denoise worker.
#[derive(Debug, Parser)]
#[command(name = "bd3lm-worker", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "BD3LM_WORKER_ADDR", default_value = "0.0.0.0:50061")]
    addr: String,
    /// Checkpoint directory (config.json + model.safetensors).
    #[arg(long, env = "BD3LM_CHECKPOINT")]
    checkpoint: PathBuf,
    /// Model id in store keys; default: the checkpoint directory's name.
    #[arg(long, env = "BD3LM_MODEL_ID")]
    model_id: Option<String>,
    /// Redis URL of the shared store.
    #[arg(long, env = "BD3LM_REDIS_URL")]
    redis: String,
    /// Prefix of every store key.
    #[arg(long, env = "BD3LM_STORE_PREFIX", default_value = "bd3lm")]
    store_prefix: String,
    /// Seconds a session lives after its last write.
    #[arg(long, env = "BD3LM_STORE_TTL_SECS", default_value_t = 86_400)]
    store_ttl_secs: u64,
    /// Blocks denoised at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "BD3LM_WORKER_CAPACITY", default_value_t = 2)]
    capacity: usize,
    /// Bytes of session KV caches kept in memory.
    #[arg(long, env = "BD3LM_WORKER_CACHE_BYTES", default_value_t = 1 << 30)]
    cache_bytes: usize,
    /// Run on the first CUDA GPU (needs a build with `--features cuda`).
    #[arg(long, env = "BD3LM_CUDA")]
    cuda: bool,
    /// Compute in bf16 (CUDA) instead of f32.
    #[arg(long, env = "BD3LM_BF16")]
    bf16: bool,
}

#[tokio::main]
async fn main() {
    bd3lm_telemetry::run_service("bd3lm-worker", run).await;
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = StoreConfig {
        prefix: args.store_prefix,
        ttl: Duration::from_secs(args.store_ttl_secs),
    };
    let store = Store::redis(&args.redis, config)?;
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    println!("bd3lm-worker listening on {}", listener.local_addr()?);
    let loaded = Arc::new(OnceLock::new());
    let cell = loaded.clone();
    let (dir, id) = (args.checkpoint.clone(), args.model_id.clone());
    let device = if args.cuda {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let dtype = if args.bf16 { DType::BF16 } else { DType::F32 };
    tokio::task::spawn_blocking(move || {
        match bd3lm_worker::load(&dir, id.as_deref(), dtype, &device) {
            Ok(l) => {
                let _ = cell.set(Arc::new(l));
            }
            Err(e) => {
                eprintln!("error: loading {}: {e:#}", dir.display());
                std::process::exit(2);
            }
        }
    });
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    bd3lm_worker::serve(
        listener,
        loaded,
        store,
        args.capacity,
        args.cache_bytes,
        shutdown,
    )
    .await
}
