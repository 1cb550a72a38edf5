//! `bd3lm-worker`: a denoise worker for deployment. Every setting is a flag or an
//! environment variable.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use bd3lm_proto::auth::Tokens;
use bd3lm_server::ServerArgs;
use bd3lm_worker::{DeviceArgs, FollowSettings, Models, WorkerSettings};
use clap::Parser;

/// A BD3-LM denoise worker.
#[derive(Debug, Parser)]
#[command(name = "bd3lm-worker", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "BD3LM_WORKER_ADDR", default_value = "0.0.0.0:50061")]
    addr: String,
    /// Checkpoint directory (config.json + model.safetensors).
    #[arg(long, env = "BD3LM_CHECKPOINT", required_unless_present = "model")]
    checkpoint: Option<PathBuf>,
    /// Model id in store keys; default: the checkpoint directory's name (with --model,
    /// the model's name).
    #[arg(long, env = "BD3LM_MODEL_ID", conflicts_with = "model")]
    model_id: Option<String>,
    #[command(flatten)]
    follow: FollowSettings,
    /// File of the internal tokens the coordinators send (`authorization: Bearer`), one per
    /// line, re-read on SIGHUP; calls without one are UNAUTHENTICATED. Required unless the
    /// worker listens on loopback only (or --insecure-no-internal-token).
    #[arg(long, env = "BD3LM_INTERNAL_TOKEN_FILE", value_name = "FILE")]
    internal_token_file: Option<PathBuf>,
    /// Serve any caller that reaches a non-loopback port, without an internal token.
    #[arg(
        long,
        env = "BD3LM_INSECURE_NO_INTERNAL_TOKEN",
        conflicts_with = "internal_token_file"
    )]
    insecure_no_internal_token: bool,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    settings: WorkerSettings,
}

fn main() -> ExitCode {
    // SAFETY: the process has one thread; the runtime's start in `run_service`.
    unsafe { bd3lm_model::set_host_threads(None, bd3lm_model::Workload::Inference) };
    bd3lm_telemetry::run_service("bd3lm-worker", run)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(id) = &args.model_id {
        bd3lm_worker::check_model_id(id)?;
    }
    let registry_dir = &args.follow.registry_dir;
    let followed = match args.follow.model.as_slice() {
        [] => None,
        [name] if args.checkpoint.is_none() => Some(name),
        [_] => anyhow::bail!("--model: give it or --checkpoint, not both"),
        _ => anyhow::bail!("--model: a worker serves one model; run a worker per model"),
    };
    if followed.is_some() && registry_dir.is_none() {
        anyhow::bail!("--model needs --registry-dir (or BD3LM_REGISTRY_DIR)");
    }
    let server = &args.server;
    let store = server
        .service
        .start(bd3lm_worker::metrics::describe)
        .await?;
    if args.internal_token_file.is_none() && !args.insecure_no_internal_token {
        loopback_only(&args.addr).await?;
    }
    let internal = internal_tokens(args.internal_token_file.as_deref())?;
    let device = args.device.device()?;
    let precision = args.device.precision();
    let ports = server.bind("bd3lm-worker", &args.addr).await?;
    let models = match (followed, &args.checkpoint) {
        (Some(name), _) => {
            let following = bd3lm_worker::models::Following {
                name: name.clone(),
                dir: registry_dir.clone().expect("checked at start"),
                device,
                precision,
            };
            following.start(&store.jobs, &args.follow)?
        }
        (None, Some(dir)) => {
            let models = Arc::new(Models::loading());
            let (dir, id, loading) = (dir.clone(), args.model_id.clone(), models.clone());
            tokio::task::spawn_blocking(move || {
                match bd3lm_worker::load(&dir, id.as_deref(), precision, &device) {
                    Ok(l) => loading.add(Arc::new(l)),
                    Err(e) => {
                        let e = bd3lm_telemetry::cli::one_line(&e);
                        eprintln!("error: loading {}: {e}", dir.display());
                        std::process::exit(2);
                    }
                }
            });
            models
        }
        (None, None) => unreachable!("clap requires --checkpoint or --model"),
    };
    let limits = args.settings.limits(args.device.device);
    server
        .serve_until_drained(|stop| {
            bd3lm_worker::serve(ports, models, store.sessions, limits, internal, stop)
        })
        .await
}

/// Refuses to serve without an internal token on an address other machines reach.
async fn loopback_only(addr: &str) -> anyhow::Result<()> {
    let resolved: Vec<_> = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("--addr {addr}"))?
        .collect();
    if resolved.is_empty() || !resolved.iter().all(|a| a.ip().is_loopback()) {
        anyhow::bail!(
            "--internal-token-file is required to listen on {addr} (not loopback): without \
             it anyone who reaches the port is served; --insecure-no-internal-token to allow"
        );
    }
    Ok(())
}

/// The internal tokens of `path`, re-read on SIGHUP; an open set without it.
fn internal_tokens(path: Option<&std::path::Path>) -> anyhow::Result<Arc<Tokens>> {
    let Some(path) = path else {
        tracing::warn!("no --internal-token-file: any caller that reaches this port is served");
        return Ok(Arc::new(Tokens::open()));
    };
    let tokens = Arc::new(Tokens::from_file(path)?);
    let reloaded = tokens.clone();
    bd3lm_telemetry::shutdown::on_hangup(move || match reloaded.reload() {
        Ok(count) => tracing::info!(count, "internal tokens reloaded"),
        Err(e) => {
            tracing::error!(error = %e, "reloading the internal tokens failed; the old ones stay")
        }
    });
    Ok(tokens)
}
