//! `bd3lm-coordinator`: the coordinator for deployment. Every setting is a flag or an
//! environment variable.

use std::process::ExitCode;
use std::sync::Arc;

use bd3lm_coordinator::{CoordinatorSettings, Pool, WorkerSource};
use bd3lm_proto::auth::Bearer;
use bd3lm_server::ServerArgs;
use clap::Parser;

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
    /// DNS names with ports resolving to the workers (Kubernetes headless services, one
    /// per worker pool), comma-separated.
    #[arg(
        long,
        env = "BD3LM_WORKERS_DNS",
        conflicts_with = "workers",
        value_delimiter = ','
    )]
    workers_dns: Vec<String>,
    /// File whose first line is the workers' internal token, sent on every call to them.
    #[arg(long, env = "BD3LM_INTERNAL_TOKEN_FILE", value_name = "FILE")]
    internal_token_file: Option<std::path::PathBuf>,
    /// Name the workers' certificates carry (with --tls-ca, calls to workers use TLS).
    #[arg(long, env = "BD3LM_TLS_WORKER_NAME", default_value = "bd3lm-worker")]
    tls_worker_name: String,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    settings: CoordinatorSettings,
}

fn main() -> ExitCode {
    bd3lm_telemetry::run_service("bd3lm-coordinator", run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let server = &args.server;
    let store = server
        .service
        .start(bd3lm_coordinator::metrics::describe)
        .await?;
    let source = match args.workers_dns.is_empty() {
        false => WorkerSource::Dns(args.workers_dns),
        true => WorkerSource::Static(args.workers),
    };
    let settings = args.settings;
    let bearer = match &args.internal_token_file {
        Some(path) => Bearer::from_file(path)?,
        None => Bearer::default(),
    };
    let pool = Pool::new(
        settings.routing,
        settings.affinity_sessions as usize,
        settings.down_after_failures,
    );
    let worker_tls = server.tls.client(&args.tls_worker_name)?;
    let pool = Arc::new(pool.with_bearer(bearer).with_tls(worker_tls));
    bd3lm_coordinator::spawn_discovery(pool.clone(), source, settings.health_interval);
    let ports = server.bind("bd3lm-coordinator", &args.addr).await?;
    server
        .serve_until_drained(|stop| bd3lm_coordinator::serve(ports, pool, store, settings, stop))
        .await
}
