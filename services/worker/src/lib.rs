//! The denoise worker: loads a checkpoint, and denoises and commits blocks of sessions
//! whose records live in the store, keeping recent sessions' KV caches in memory.
//!
//! For a block it takes the session's cache from memory, else from the store's per-block
//! KV blobs, else rebuilds it from the session's tokens; a blob that fails its checksum or
//! belongs to other weights is a miss (logged), never data. It writes the new block's KV
//! blob, then commits the tokens to the session record (the commit point), then answers.

pub mod service;
pub mod sessions;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use bd3lm_kvstore::Store;
use bd3lm_model::checkpoint::Checkpoint;
use bd3lm_proto::v1::denoise_worker_server::DenoiseWorkerServer;
use candle_core::{DType, Device};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use service::{Loaded, WorkerService};

/// Loads the checkpoint in `dir` (blocking: seconds for large models).
pub fn load(
    dir: &Path,
    model_id: Option<&str>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<Loaded> {
    let ckpt = Checkpoint::open(dir)?;
    let fingerprint = ckpt.fingerprint()?;
    let model_id = match model_id {
        Some(id) => id.to_string(),
        None => default_model_id(dir),
    };
    let model = ckpt.load_model(dtype, device)?;
    tracing::info!(%model_id, %fingerprint, dir = %dir.display(), "model loaded");
    Ok(Loaded {
        model,
        model_id,
        fingerprint,
    })
}

/// The model id of a checkpoint directory: its name.
pub fn default_model_id(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| PathBuf::from(dir));
    canonical
        .file_name()
        .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
}

/// Serves the worker on `listener` until `shutdown` resolves. Health reports NOT_SERVING
/// until `loaded` holds the model.
pub async fn serve(
    listener: TcpListener,
    loaded: Arc<OnceLock<Arc<Loaded>>>,
    store: Store,
    capacity: usize,
    cache_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<DenoiseWorkerServer<WorkerService>>()
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let watch = loaded.clone();
    tokio::spawn(async move {
        while watch.get().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
    let service = WorkerService::new(loaded, store, capacity, cache_bytes);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(DenoiseWorkerServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .context("worker server")
}
