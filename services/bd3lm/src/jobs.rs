//! `bd3lm train --addr`, `bd3lm jobs` and `bd3lm models`: clients of the Training service
//! of a running system.

use anyhow::{Context, bail};
use bd3lm_proto::v1 as wire;
use bd3lm_proto::v1::training_client::TrainingClient;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use crate::remote::{Authorized, RemoteArgs, status};
use crate::train::TrainArgs;
use bd3lm_jobs::spec::{wire_recipe, wire_shape};

/// `bd3lm jobs`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// The latest jobs, newest first.
    List {
        /// Most jobs shown.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Follow a job until it ends; exits 1 unless it succeeded.
    Watch {
        /// The job's id.
        job_id: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Cancel a job (a running one stops within a training step).
    Cancel {
        /// The job's id.
        job_id: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Delete an ended job's record.
    Delete {
        /// The job's id.
        job_id: String,
        #[command(flatten)]
        remote: RemoteArgs,
    },
}

/// `bd3lm models`.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// The registry's models and versions (one model's with a name).
    List {
        /// Only this model.
        name: Option<String>,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Retire a version: it leaves the registry, workers following its name move to the
    /// newest version left, and the trainers remove its files.
    Retire(VersionArgs),
    /// Pin a version: the trainers' --keep-versions policy never retires it.
    Pin(VersionArgs),
    /// Unpin a version.
    Unpin(VersionArgs),
}

/// One model version on a server.
#[derive(Debug, clap::Args)]
pub struct VersionArgs {
    /// The version, as NAME@VERSION.
    #[arg(value_parser = version_ref)]
    version: (String, u64),
    #[command(flatten)]
    remote: RemoteArgs,
}

/// Parses NAME@VERSION.
fn version_ref(given: &str) -> Result<(String, u64), String> {
    let (name, version) = given
        .split_once('@')
        .ok_or("expected NAME@VERSION, e.g. tiny@3")?;
    let version = version
        .parse()
        .ok()
        .filter(|v| *v > 0)
        .ok_or("the VERSION of NAME@VERSION is a number from 1")?;
    Ok((name.to_string(), version))
}

type Client = TrainingClient<Authorized>;

/// Runs a `jobs` command; whether it succeeded.
pub async fn jobs(command: JobsCommand) -> anyhow::Result<bool> {
    match command {
        JobsCommand::List { limit, remote } => {
            let mut client = TrainingClient::new(remote.connect().await?);
            let request = wire::ListJobsRequest { limit: Some(limit) };
            let jobs = client
                .list_jobs(request)
                .await
                .map_err(status)?
                .into_inner()
                .jobs;
            println!(
                "{:<32}  {:<9}  {:>13}  {:>8}  {:>10}  {:>8}  published",
                "job", "state", "step", "loss", "ppl bound", "attempts"
            );
            for job in &jobs {
                println!("{}", job_line(job));
            }
            Ok(true)
        }
        JobsCommand::Watch { job_id, remote } => {
            let mut client = TrainingClient::new(remote.connect().await?);
            watch(&mut client, &job_id).await
        }
        JobsCommand::Cancel { job_id, remote } => {
            let mut client = TrainingClient::new(remote.connect().await?);
            let job = client
                .cancel_job(wire::CancelJobRequest { job_id })
                .await
                .map_err(status)?
                .into_inner();
            println!("{}", job_line(&job));
            Ok(true)
        }
        JobsCommand::Delete { job_id, remote } => {
            let mut client = TrainingClient::new(remote.connect().await?);
            let job = client
                .delete_job(wire::DeleteJobRequest { job_id })
                .await
                .map_err(status)?
                .into_inner();
            println!("deleted {}", job_line(&job));
            Ok(true)
        }
    }
}

/// Runs a `models` command.
pub async fn models(command: ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::List { name, remote } => list_models(name, remote).await,
        ModelsCommand::Retire(args) => change(Change::Retire, args).await,
        ModelsCommand::Pin(args) => change(Change::Pin, args).await,
        ModelsCommand::Unpin(args) => change(Change::Unpin, args).await,
    }
}

/// What `bd3lm models` does to one version.
#[derive(Clone, Copy)]
enum Change {
    Retire,
    Pin,
    Unpin,
}

/// Retires, pins or unpins `name@version`, and says so.
async fn change(how: Change, args: VersionArgs) -> anyhow::Result<()> {
    let ((name, version), remote) = (args.version, args.remote);
    let mut client = TrainingClient::new(remote.connect().await?);
    let request = wire::ModelVersionRequest { name, version };
    let (done, answer) = match how {
        Change::Retire => ("retired", client.retire_model_version(request).await),
        Change::Pin => ("pinned", client.pin_model_version(request).await),
        Change::Unpin => ("unpinned", client.unpin_model_version(request).await),
    };
    let v = answer.map_err(status)?.into_inner();
    println!("{done} {}@{}", v.name, v.version);
    Ok(())
}

/// Prints the registry's models (or the one named).
async fn list_models(name: Option<String>, remote: RemoteArgs) -> anyhow::Result<()> {
    let mut client = TrainingClient::new(remote.connect().await?);
    let models = match name {
        Some(name) => vec![
            client
                .get_model(wire::GetModelRequest { name })
                .await
                .map_err(status)?
                .into_inner(),
        ],
        None => {
            client
                .list_models(wire::ListModelsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .models
        }
    };
    println!(
        "{:<24}  {:>7}  {:<16}  {:<32}  {:>8}  {:>10}  {:>3}  pinned",
        "model", "version", "fingerprint", "job", "step", "ppl bound", "L'"
    );
    for model in &models {
        for v in &model.versions {
            println!(
                "{:<24}  {:>7}  {:<16}  {:<32}  {:>8}  {:>10.2}  {:>3}  {}",
                v.name,
                v.version,
                v.fingerprint,
                v.job_id,
                v.step,
                v.perplexity_bound,
                v.block_size,
                if v.pinned { "yes" } else { "" }
            );
        }
    }
    Ok(())
}

/// `bd3lm train --addr`: submits the job the flags describe, then follows it (unless
/// `--detach`); whether it succeeded.
pub async fn submit(args: &TrainArgs, addr: &str) -> anyhow::Result<bool> {
    let spec = job_spec(args)?;
    let channel = args.credentials.connect(addr).await?;
    let mut client = TrainingClient::new(channel);
    let job = client.submit_job(spec).await.map_err(status)?.into_inner();
    println!("{}", job.job_id);
    if args.detach {
        return Ok(true);
    }
    watch(&mut client, &job.job_id).await
}

/// The job the flags of `bd3lm train --addr` describe. The data path is made absolute
/// here: the server reads it on storage it shares with this machine.
fn job_spec(args: &TrainArgs) -> anyhow::Result<wire::JobSpec> {
    let data = args.data.as_ref().context("--data is required")?;
    let data = std::path::absolute(data).with_context(|| format!("{}", data.display()))?;
    if args.schedule != bd3lm_diffusion::NoiseSchedule::LogLinear || args.save_dtype != "f32" {
        bail!(
            "--schedule and --save-dtype are local-only: the training service trains log-linear and saves f32"
        );
    }
    let init = match &args.fine_tune {
        Some(model) => {
            let (name, version) = match model.split_once('@') {
                Some((name, v)) => (
                    name,
                    Some(
                        v.parse()
                            .context("--fine-tune: NAME@VERSION needs a number")?,
                    ),
                ),
                None => (model.as_str(), None),
            };
            wire::job_spec::Init::FineTune(wire::ModelRef {
                name: name.into(),
                version,
            })
        }
        None => wire::job_spec::Init::Shape(wire_shape(&args.backbone())),
    };
    Ok(wire::JobSpec {
        data: data.display().to_string(),
        init: Some(init),
        block_size: args.block_size.map(|b| b as u32),
        publish_as: args
            .name
            .clone()
            .context("--name is required with --addr")?,
        publish_each_save: args.publish_each_save,
        ..wire_recipe(&args.recipe())
    })
}

/// Follows job `id` with a progress bar until it ends; whether it succeeded.
async fn watch(client: &mut Client, id: &str) -> anyhow::Result<bool> {
    let request = wire::GetJobRequest {
        job_id: id.to_string(),
    };
    let mut stream = client
        .watch_job(request)
        .await
        .map_err(status)?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("a valid template"),
    );
    let mut last = None;
    let mut validated = 0;
    while let Some(job) = stream.message().await.map_err(status)? {
        let p = job.progress.unwrap_or_default();
        bar.set_length(p.total_steps);
        bar.set_position(p.step);
        bar.set_message(format!(
            "{} loss {:.3} {:.0} tok/s eta {:.0} s",
            state_name(job.state),
            p.loss,
            p.tokens_per_s,
            p.eta_seconds
        ));
        if let Some(v) = p.validation.filter(|v| v.step > validated) {
            validated = v.step;
            bar.println(format!(
                "step {}: validation NELBO {:.4} nats/token, perplexity bound {:.2}",
                v.step, v.nelbo, v.perplexity_bound
            ));
        }
        last = Some(job);
    }
    bar.finish_and_clear();
    let job = last.context("the job stream ended without a message")?;
    let state = wire::JobState::try_from(job.state).unwrap_or_default();
    match state {
        wire::JobState::Succeeded => {
            let name = job.spec.as_ref().map_or("", |s| s.publish_as.as_str());
            let versions: Vec<String> = job.published_versions.iter().map(u64::to_string).collect();
            eprintln!(
                "job {} succeeded: published {name} version {}",
                job.job_id,
                versions.join(", ")
            );
        }
        wire::JobState::Failed => eprintln!("job {} failed: {}", job.job_id, job.error),
        _ => eprintln!("job {} {}", job.job_id, state_name(job.state)),
    }
    Ok(state == wire::JobState::Succeeded)
}

fn state_name(state: i32) -> String {
    wire::JobState::try_from(state).map_or("unknown".into(), |s| {
        s.as_str_name()
            .trim_start_matches("JOB_STATE_")
            .to_lowercase()
    })
}

fn job_line(job: &wire::Job) -> String {
    let p = job.progress.unwrap_or_default();
    let ppl = p
        .validation
        .map_or("-".to_string(), |v| format!("{:.2}", v.perplexity_bound));
    let published: Vec<String> = job.published_versions.iter().map(u64::to_string).collect();
    format!(
        "{:<32}  {:<9}  {:>13}  {:>8.4}  {:>10}  {:>8}  {}",
        job.job_id,
        state_name(job.state),
        format!("{}/{}", p.step, p.total_steps),
        p.loss,
        ppl,
        job.attempts,
        published.join(",")
    )
}
