//! The coordinator: the public gRPC front of the system. It never runs the network.
//!
//! One request goes through one module per job:
//! [`validation`] (a valid request or one error naming the field) → [`plan`] (the
//! session created or continued in the store) → [`stream`] (block after block, stop
//! rules, decoding, streaming; the session's [`lease`] held throughout) → [`admission`] (a place among the admitted
//! generations, then a worker slot per block, the API keys in turn)
//! → [`dispatch`] (the worker holding the session's cache,
//! another on an error, a timeout or a disconnect) over the [`pool`] of workers;
//! [`service`] is the gRPC surface and [`settings`] the flags. [`training`] serves the
//! `Training` API: jobs for the trainer workers and the model registry's records.
//! [`http`] is the OpenAI-compatible HTTP API over the same Generation service.
#![warn(missing_docs)]

pub mod admission;
pub mod dispatch;
pub mod error;
pub mod http;
pub mod lease;
pub mod metrics;
pub mod plan;
pub mod pool;
pub mod service;
pub mod settings;
pub mod stream;
#[cfg(test)]
mod tests;
pub mod training;
pub mod validation;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bd3lm_kvstore::Stores;
use bd3lm_proto::auth::Tokens;
use bd3lm_proto::v1::generation_server::GenerationServer;
use bd3lm_proto::v1::training_server::TrainingServer;
use bd3lm_telemetry::probes::Ports;
use tonic::service::interceptor::InterceptedService;

pub use error::Error;
pub use pool::{Pool, Serving, WorkerSource};
pub use service::Coordinator;
pub use settings::{CoordinatorSettings, Persistence, Routing};
pub use training::TrainingService;
pub use validation::Limits;

/// The public API's keys from `--api-keys`, re-read on SIGHUP; an open set without it.
fn api_keys(settings: &CoordinatorSettings) -> anyhow::Result<Arc<Tokens>> {
    let Some(path) = &settings.api_keys else {
        tracing::warn!("no --api-keys: the public API is open to every caller");
        return Ok(Arc::new(Tokens::open()));
    };
    let keys = Arc::new(Tokens::from_file(path)?);
    let reloaded = keys.clone();
    bd3lm_telemetry::shutdown::on_hangup(move || match reloaded.reload() {
        Ok(count) => tracing::info!(count, "API keys reloaded"),
        Err(e) => tracing::error!(error = %e, "reloading the API keys failed; the old ones stay"),
    });
    Ok(keys)
}

/// Keeps the pool's addresses and health current, every `interval`.
pub fn spawn_discovery(
    pool: Arc<Pool>,
    source: WorkerSource,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let healthy = pool.refresh(&source).await;
            metrics::workers_healthy(healthy);
            tracing::debug!(healthy, "worker health checked");
            tokio::time::sleep(interval).await;
        }
    })
}

/// How often readiness asks the store whether it answers.
const STORE_PROBE: Duration = Duration::from_millis(500);

/// Serves the coordinator on `ports` until `shutdown` resolves, then stops accepting and
/// lets the streams in flight finish. Health (readiness) reports SERVING while at least
/// one worker is healthy, the stores answer and no shutdown was asked for; it is also
/// served on the plain health port, if any.
pub async fn serve(
    mut ports: Ports,
    pool: Arc<Pool>,
    stores: Stores,
    settings: CoordinatorSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (reporter, health) = bd3lm_telemetry::probes::health().await;
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stopping.clone();
    let shutdown = async move {
        shutdown.await;
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    // Expired leases and tombstones carry no Redis TTL: every coordinator sweeps them,
    // as often as a lease lapses.
    stores.sessions.spawn_janitor(settings.lease_ttl);
    let mut serving = pool.watch();
    // Both stores share one backend: the session store's answer is both's.
    let probe = stores.sessions.clone();
    tokio::spawn(async move {
        loop {
            let stopping = stopping.load(std::sync::atomic::Ordering::Relaxed);
            // Ready: not shutting down, a worker to send blocks to, a store that answers.
            let store_ok = matches!(
                tokio::time::timeout(Duration::from_secs(1), probe.ping()).await,
                Ok(Ok(()))
            );
            let workers = serving.borrow_and_update().workers;
            let status = if !stopping && store_ok && workers > 0 {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status("bd3lm.v1.Generation", status)
                .await;
            // Training needs only the store: jobs queue while no trainer runs.
            let training = if !stopping && store_ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter
                .set_service_status("bd3lm.v1.Training", training)
                .await;
            // Workers' changes are told at once; the store (and a shutdown) is probed.
            tokio::select! {
                changed = serving.changed() => if changed.is_err() { break },
                () = tokio::time::sleep(STORE_PROBE) => {}
            }
        }
    });
    let keys = api_keys(&settings)?;
    let reflection = settings
        .reflection
        .then(|| {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(bd3lm_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .build_v1()
        })
        .transpose()
        .context("building the reflection service")?;
    let max_request = settings.limits.max_request_bytes;
    let training = TrainingService::new(stores.jobs, &settings);
    training.spawn_retention();
    let http = match &settings.http_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the HTTP API on {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, tls = ports.https.is_some(), "HTTP API listening");
            Some(http::Listener::new(listener, ports.https.take()))
        }
        None => None,
    };
    let coordinator = Coordinator::new(pool, stores.sessions, settings);
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let http = http.map(|listener| {
        let (coordinator, keys) = (coordinator.clone(), keys.clone());
        let served = http::serve(listener, coordinator, keys, max_request, shutdown.clone());
        tokio::spawn(served)
    });
    let generation = GenerationServer::new(coordinator).max_decoding_message_size(max_request);
    let training = TrainingServer::new(training);
    let (mut server, incoming) = ports.start(&health)?;
    let grpc = server
        .add_service(health)
        // Reflection describes the API to whoever may call it: behind the same keys.
        .add_optional_service(
            reflection.map(|r| InterceptedService::new(r, keys.clone().interceptor())),
        )
        .add_service(InterceptedService::new(
            generation,
            keys.clone().interceptor(),
        ))
        .add_service(InterceptedService::new(training, keys.interceptor()))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("coordinator server");
    if let Some(http) = http {
        http.await
            .context("the HTTP API stopped")?
            .context("HTTP API server")?;
    }
    grpc
}
