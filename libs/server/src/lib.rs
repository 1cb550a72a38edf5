//! The start-up the three deployment binaries (`bd3lm-coordinator`, `bd3lm-worker`,
//! `bd3lm-trainer`) share, written once: the flags every one takes ([`ServiceArgs`]: the
//! store and the metrics endpoint), those of the two gRPC servers ([`ServerArgs`]: TLS, the
//! drain period and the health port), binding the ports and serving until drained.
#![warn(missing_docs)]

use std::future::Future;

use anyhow::Context;
use bd3lm_kvstore::{StoreArgs, Stores};
use bd3lm_proto::tls::TlsFiles;
use bd3lm_telemetry::metrics::MetricsArgs;
use bd3lm_telemetry::probes::{HealthArgs, Ports};
use bd3lm_telemetry::shutdown::{self, DrainArgs, Stop};

/// The flags every deployment binary takes.
#[derive(Debug, clap::Args)]
pub struct ServiceArgs {
    /// The store of sessions and jobs.
    #[command(flatten)]
    pub store: StoreArgs,
    /// The Prometheus endpoint.
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

impl ServiceArgs {
    /// Serves the metrics (with `describe`'s and the store's descriptions) and opens the
    /// store, shared by every task of the process, refusing a Redis that may evict what
    /// must stay ([`bd3lm_kvstore::eviction::check`]).
    pub async fn start(&self, describe: fn()) -> anyhow::Result<Stores> {
        self.metrics.install()?;
        describe();
        bd3lm_kvstore::metrics::describe();
        let stores = self.store.open_shared()?;
        bd3lm_kvstore::eviction::check(&stores.sessions).await?;
        Ok(stores)
    }
}

/// The flags of a gRPC server binary: the service's, its TLS, its drain period and its
/// health port.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// The store and the metrics.
    #[command(flatten)]
    pub service: ServiceArgs,
    /// TLS on the gRPC port, and towards the servers this one calls.
    #[command(flatten)]
    pub tls: TlsFiles,
    /// How long calls in flight may finish after a shutdown signal.
    #[command(flatten)]
    pub drain: DrainArgs,
    /// The plain-text health port.
    #[command(flatten)]
    pub health: HealthArgs,
}

impl ServerArgs {
    /// Binds the gRPC port at `addr` and the health port, and prints `"{name} listening on
    /// {address}"` (what operators and the end-to-end tests read to find the port).
    pub async fn bind(&self, name: &str, addr: &str) -> anyhow::Result<Ports> {
        let grpc = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        println!("{name} listening on {}", grpc.local_addr()?);
        Ok(Ports {
            grpc,
            tls: self.tls.server()?,
            https: self.tls.acceptor()?,
            health: self.health.bind().await?,
        })
    }

    /// Runs the server `serve` builds around its stop until SIGTERM or SIGINT and the
    /// drain period after it.
    pub async fn serve_until_drained<S>(&self, serve: impl FnOnce(Stop) -> S) -> anyhow::Result<()>
    where
        S: Future<Output = anyhow::Result<()>>,
    {
        shutdown::drained(shutdown::signal(), self.drain.drain, serve).await
    }
}
