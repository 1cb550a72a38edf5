//! `bd3lm-coordinator`: the coordinator for deployment. Every setting is a flag or an
//! environment variable.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use bd3lm_coordinator::{CoordinatorSettings, Pool, WorkerSource};
use bd3lm_kvstore::StoreArgs;
use bd3lm_proto::auth::Bearer;
use bd3lm_proto::tls::TlsFiles;
use bd3lm_telemetry::metrics::MetricsArgs;
use bd3lm_telemetry::probes::{HealthArgs, Ports};
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
    /// A DNS name and port resolving to every worker (a Kubernetes headless service).
    #[arg(long, env = "BD3LM_WORKERS_DNS", conflicts_with = "workers")]
    workers_dns: Option<String>,
    /// File whose first line is the workers' internal token, sent on every call to them.
    #[arg(long, env = "BD3LM_INTERNAL_TOKEN_FILE", value_name = "FILE")]
    internal_token_file: Option<std::path::PathBuf>,
    /// Name the workers' certificates carry (with --tls-ca, calls to workers use TLS).
    #[arg(long, env = "BD3LM_TLS_WORKER_NAME", default_value = "bd3lm-worker")]
    tls_worker_name: String,
    #[command(flatten)]
    tls: TlsFiles,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    settings: CoordinatorSettings,
    #[command(flatten)]
    drain: bd3lm_telemetry::shutdown::DrainArgs,
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    health: HealthArgs,
}

fn main() -> ExitCode {
    bd3lm_telemetry::run_service("bd3lm-coordinator", run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    args.metrics.install()?;
    bd3lm_coordinator::metrics::describe();
    bd3lm_kvstore::metrics::describe();
    let store = args.store.open_shared()?;
    let source = match args.workers_dns {
        Some(name) => WorkerSource::Dns(name),
        None => WorkerSource::Static(args.workers),
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
    let worker_tls = args.tls.client(&args.tls_worker_name)?;
    let pool = Arc::new(pool.with_bearer(bearer).with_tls(worker_tls));
    bd3lm_coordinator::spawn_discovery(pool.clone(), source, settings.health_interval);
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    println!("bd3lm-coordinator listening on {}", listener.local_addr()?);
    let ports = Ports {
        grpc: listener,
        tls: args.tls.server()?,
        health: args.health.bind().await?,
    };
    let signal = bd3lm_telemetry::shutdown::signal();
    bd3lm_telemetry::shutdown::drained(signal, args.drain.drain, |stop| {
        bd3lm_coordinator::serve(ports, pool, store, settings, stop)
    })
    .await
}
