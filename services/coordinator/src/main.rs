//! `bd3lm-coordinator`: the coordinator for deployment. Every setting is a flag or an
//! environment variable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bd3lm_coordinator::{CoordinatorSettings, Limits, Pool, Routing, WorkerSource};
use bd3lm_kvstore::{Store, StoreConfig};
use clap::{Parser, ValueEnum};

/// The BD3-LM coordinator.
#[derive(Debug, Parser)]
#[command(name = "bd3lm-coordinator", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "BD3LM_ADDR", default_value = "0.0.0.0:50051")]
    addr: String,
    /// Worker addresses, comma-separated `host:port`.
    #[arg(
        long,
        env = "BD3LM_WORKERS",
        value_delimiter = ',',
        required_unless_present = "workers_dns"
    )]
    workers: Vec<String>,
    /// A DNS name and port resolving to every worker (a Kubernetes headless service).
    #[arg(long, env = "BD3LM_WORKERS_DNS", conflicts_with = "workers")]
    workers_dns: Option<String>,
    /// Seconds between worker discovery and health checks.
    #[arg(long, env = "BD3LM_HEALTH_INTERVAL_SECS", default_value_t = 1.0)]
    health_interval_secs: f64,
    /// Redis URL of the shared store.
    #[arg(long, env = "BD3LM_REDIS_URL")]
    redis: String,
    /// Prefix of every store key.
    #[arg(long, env = "BD3LM_STORE_PREFIX", default_value = "bd3lm")]
    store_prefix: String,
    /// Seconds a session lives after its last write.
    #[arg(long, env = "BD3LM_STORE_TTL_SECS", default_value_t = 86_400)]
    store_ttl_secs: u64,
    /// tokenizer.json for text prompts.
    #[arg(long, env = "BD3LM_TOKENIZER")]
    tokenizer: Option<PathBuf>,
    /// Routing of blocks.
    #[arg(long, env = "BD3LM_ROUTING", value_enum, default_value_t = RoutingArg::Affinity)]
    routing: RoutingArg,
    /// Seconds to wait for one block from one worker.
    #[arg(long, env = "BD3LM_BLOCK_TIMEOUT_SECS", default_value_t = 120.0)]
    block_timeout_secs: f64,
    /// Most prompt tokens.
    #[arg(long, env = "BD3LM_MAX_PROMPT_TOKENS", default_value_t = Limits::default().max_prompt_tokens)]
    max_prompt_tokens: usize,
    /// Most new tokens per request.
    #[arg(long, env = "BD3LM_MAX_NEW_TOKENS", default_value_t = Limits::default().max_new_tokens)]
    max_new_tokens: usize,
    /// Most tokens in a session.
    #[arg(long, env = "BD3LM_MAX_TOTAL_TOKENS", default_value_t = Limits::default().max_total_tokens)]
    max_total_tokens: usize,
    /// Most stop sequences per request.
    #[arg(long, env = "BD3LM_MAX_STOP_SEQUENCES", default_value_t = Limits::default().max_stop_sequences)]
    max_stop_sequences: usize,
    /// Most denoising steps per block a request may ask for.
    #[arg(long, env = "BD3LM_MAX_STEPS", default_value_t = Limits::default().max_steps)]
    max_steps: usize,
    /// Largest request, in bytes.
    #[arg(long, env = "BD3LM_MAX_REQUEST_BYTES", default_value_t = Limits::default().max_request_bytes)]
    max_request_bytes: usize,
}

/// Routing of blocks to workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoutingArg {
    /// The worker holding the session's cache, else the least loaded.
    Affinity,
    /// Never the previous block's worker (tests cache transfer through the store).
    Rotate,
}

#[tokio::main]
async fn main() {
    bd3lm_telemetry::run_service("bd3lm-coordinator", run).await;
}

async fn run(args: Args) -> anyhow::Result<()> {
    let store = Store::redis(
        &args.redis,
        StoreConfig {
            prefix: args.store_prefix,
            ttl: Duration::from_secs(args.store_ttl_secs),
        },
    )?;
    let source = match args.workers_dns {
        Some(name) => WorkerSource::Dns(name),
        None => WorkerSource::Static(args.workers),
    };
    let routing = match args.routing {
        RoutingArg::Affinity => Routing::Affinity,
        RoutingArg::Rotate => Routing::Rotate,
    };
    let pool = Arc::new(Pool::new(routing));
    bd3lm_coordinator::spawn_discovery(
        pool.clone(),
        source,
        Duration::from_secs_f64(args.health_interval_secs),
    );
    let settings = CoordinatorSettings {
        limits: Limits {
            max_prompt_tokens: args.max_prompt_tokens,
            max_new_tokens: args.max_new_tokens,
            max_total_tokens: args.max_total_tokens,
            max_request_bytes: args.max_request_bytes,
            max_stop_sequences: args.max_stop_sequences,
            max_steps: args.max_steps,
            ..Limits::default()
        },
        block_timeout: Duration::from_secs_f64(args.block_timeout_secs),
        tokenizer: args.tokenizer,
        ..CoordinatorSettings::default()
    };
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    println!("bd3lm-coordinator listening on {}", listener.local_addr()?);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    bd3lm_coordinator::serve(listener, pool, store, settings, shutdown).await
}
