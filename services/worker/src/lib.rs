//! The denoise worker: loads a checkpoint, and denoises and commits blocks of sessions
//! whose records live in the store, keeping recent sessions' KV caches in memory.
//!
//! One block goes through one module per stage: [`service`] (the gRPC surface and
//! admission) → [`cache`] (memory, else the store's KV blobs, else a rebuild from tokens)
//! → [`block`] (the session opened, a new one's prompt prefilled) → [`scheduler`] (the
//! block denoised and committed in the running batch with other sessions' blocks) →
//! [`block`] (the new KV blobs) → [`commit`] (blobs, then the record by compare-and-set:
//! the commit point). [`sessions`] keeps recent
//! caches in memory, [`prefix`] the shared prompt blocks; [`models`] holds the model versions served (following the registry
//! with `--model`); [`settings`] holds the flags.
#![warn(missing_docs)]

pub mod block;
pub mod cache;
pub mod commit;
pub mod lru;
pub mod metrics;
pub mod models;
pub mod persist;
pub mod prefix;
pub mod run;
pub mod scheduler;
pub mod service;
pub mod sessions;
pub mod settings;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use bd3lm_kvstore::SessionStore;
use bd3lm_model::checkpoint::Checkpoint;
use bd3lm_proto::auth::Tokens;
use bd3lm_proto::v1::denoise_worker_server::DenoiseWorkerServer;
use bd3lm_telemetry::probes::Ports;
use candle_core::Device;

pub use models::{Models, Rollout};
pub use service::{LoadedModel, WorkerService};
pub use settings::{DeviceArgs, FollowSettings, Precision, WorkerLimits, WorkerSettings};

/// Loads the checkpoint in `dir` (blocking: seconds for large models). A model id that
/// KV blobs cannot hold is refused before anything is read.
pub fn load(
    dir: &Path,
    model_id: Option<&str>,
    precision: Precision,
    device: &Device,
) -> anyhow::Result<LoadedModel> {
    let model_id = match model_id {
        Some(id) => id.to_string(),
        None => default_model_id(dir),
    };
    check_model_id(&model_id)?;
    let ckpt = Checkpoint::open(dir)?;
    let fingerprint = state_fingerprint(&ckpt.fingerprint()?, precision, &ckpt.config);
    let model = precision.load_model(ckpt, device)?;
    tracing::info!(%model_id, %fingerprint, dir = %dir.display(), "model loaded");
    Ok(LoadedModel {
        model,
        model_id,
        fingerprint,
        version: None,
    })
}

/// The fingerprint of the KV state a worker computes: its weights' fingerprint, compute
/// and KV precisions and configuration (16 hex digits). Workers that differ in any of them
/// never share blobs.
pub fn state_fingerprint(
    weights: &str,
    precision: Precision,
    config: &bd3lm_model::Config,
) -> String {
    let Precision { compute, kv } = precision;
    let described = format!("{weights}|{compute:?}|kv {kv:?}|{config:?}");
    format!("{:016x}", bd3lm_bytes::checksum(described.as_bytes()))
}

/// Checks that `id` fits in KV blobs and store keys: 1 to [`bd3lm_kvstore::blob::MAX_NAME`]
/// bytes, no `:` (the store's key separator) and no control characters.
pub fn check_model_id(id: &str) -> anyhow::Result<()> {
    let max = bd3lm_kvstore::blob::MAX_NAME;
    if id.is_empty() || id.len() > max {
        anyhow::bail!("model id: expected 1 to {max} bytes, found {}", id.len());
    }
    if id.chars().any(|c| c == ':' || c.is_control()) {
        anyhow::bail!("model id: ':' and control characters are not allowed");
    }
    Ok(())
}

/// The model id of a checkpoint directory: its name.
pub fn default_model_id(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| PathBuf::from(dir));
    canonical
        .file_name()
        .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
}

/// Serves the worker on `ports` until `shutdown` resolves, then reports NOT_SERVING
/// and lets the blocks in flight finish. Health reports NOT_SERVING until `models` holds
/// a model. `DenoiseWorker` calls need one of the `internal` tokens (health and
/// reflection are open, for probes). Liveness turns NOT_SERVING if the batch thread dies.
pub async fn serve(
    ports: Ports,
    models: Arc<Models>,
    store: SessionStore,
    limits: WorkerLimits,
    internal: Arc<Tokens>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = bd3lm_telemetry::probes::health().await;
    not_serving(&reporter).await;
    let liveness = reporter.clone();
    let stopping = reporter.clone();
    let shutdown = async move {
        shutdown.await;
        not_serving(&stopping).await;
    };
    let watch = models.clone();
    tokio::spawn(async move {
        watch.loaded().await;
        reporter
            .set_serving::<DenoiseWorkerServer<WorkerService>>()
            .await;
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bd3lm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let service = WorkerService::new(models, store, limits).with_liveness(liveness);
    let (mut server, incoming) = ports.start(&health)?;
    server
        .add_service(health)
        .add_service(reflection)
        .add_service(DenoiseWorkerServer::with_interceptor(
            service,
            internal.interceptor(),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("worker server")
}

/// Reports the worker NOT_SERVING (loading, or draining).
async fn not_serving(reporter: &tonic_health::server::HealthReporter) {
    reporter
        .set_not_serving::<DenoiseWorkerServer<WorkerService>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model id longer than a blob can hold would make every blob unreadable and force
    /// silent rebuilds: it is refused at start-up instead.
    #[test]
    fn model_ids_blobs_cannot_hold_are_refused() {
        assert!(check_model_id("demo-model").is_ok());
        let long = "m".repeat(bd3lm_kvstore::blob::MAX_NAME + 1);
        let err = load(
            Path::new("/nonexistent"),
            Some(&long),
            Precision::F32,
            &Device::Cpu,
        );
        assert!(err.err().unwrap().to_string().contains("model id"));
        assert!(check_model_id("a:b").is_err());
        assert!(check_model_id("").is_err());
    }
}
