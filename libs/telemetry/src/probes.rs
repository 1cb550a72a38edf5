//! Health for orchestrators. Every server answers `grpc.health.v1` on its own port; the
//! service `""` (and the server's API service) is readiness, [`LIVENESS`] is liveness.
//! Kubernetes' gRPC probes cannot speak TLS, so `--health-addr` also serves the health
//! service alone, in plain text, on a port of its own: it tells nothing but statuses.

use std::net::SocketAddr;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

/// The health service name of liveness: SERVING while the process can do its work
/// (a worker whose batch thread died reports NOT_SERVING, to be restarted); readiness
/// comes and goes with dependencies and draining, liveness does not.
pub const LIVENESS: &str = "liveness";

/// The plain-text health port.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct HealthArgs {
    /// Also serve `grpc.health.v1` alone, in plain text, on this address (for
    /// Kubernetes' gRPC probes when the main port speaks TLS).
    #[arg(
        long = "health-addr",
        env = "BD3LM_HEALTH_ADDR",
        value_name = "HOST:PORT"
    )]
    pub health_addr: Option<SocketAddr>,
}

impl HealthArgs {
    /// Binds the health port, when one was asked for, so a bad address fails at start.
    pub async fn bind(&self) -> anyhow::Result<Option<TcpListener>> {
        let Some(addr) = self.health_addr else {
            return Ok(None);
        };
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the health port {addr}"))?;
        Ok(Some(listener))
    }
}

/// Where a server listens: its gRPC port (speaking TLS when `tls` is given) and the
/// plain-text health port, when asked for.
pub struct Ports {
    /// The gRPC port.
    pub grpc: TcpListener,
    /// The gRPC port's TLS.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// The same TLS for a port that is not gRPC (the coordinator's HTTP API).
    pub https: Option<tokio_rustls::TlsAcceptor>,
    /// The plain-text health port.
    pub health: Option<TcpListener>,
}

impl Ports {
    /// A plain-text gRPC port without a health port of its own.
    pub fn plain(grpc: TcpListener) -> Self {
        Self {
            grpc,
            tls: None,
            https: None,
            health: None,
        }
    }

    /// The gRPC server builder of these ports (TLS configured) and the gRPC port as a
    /// stream of connections; the health port, if any, starts serving `health` now.
    pub fn start<S>(
        self,
        health: &HealthServer<S>,
    ) -> anyhow::Result<(tonic::transport::Server, TcpIncoming)>
    where
        S: Health,
    {
        spawn_plain(self.health, health.clone());
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            server = server.tls_config(tls).context("the TLS certificate")?;
        }
        Ok((server, incoming(self.grpc)))
    }
}

/// The health reporter and service of a server, with liveness SERVING.
pub async fn health() -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    (reporter, service)
}

/// Serves `service` alone on `listener`, when given, for the life of the process: probes
/// keep their answers through a drain (readiness then says NOT_SERVING).
fn spawn_plain<S>(listener: Option<TcpListener>, service: HealthServer<S>)
where
    S: Health,
{
    let Some(listener) = listener else {
        return;
    };
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming(listener))
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the health port stopped");
        }
    });
}

/// The connections of `listener`, with Nagle's algorithm off: a response's frames are
/// small writes in a row, and with it on the second waited for the client's delayed
/// acknowledgement of the first (40 ms on Linux, seen as the first block of a stream
/// arriving 40 ms late).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_client::HealthClient;

    #[tokio::test]
    async fn the_plain_port_answers_liveness_and_readiness() {
        let (reporter, service) = health().await;
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let listener = HealthArgs {
            health_addr: Some("127.0.0.1:0".parse().unwrap()),
        }
        .bind()
        .await
        .unwrap()
        .unwrap();
        let addr = listener.local_addr().unwrap();
        spawn_plain(Some(listener), service);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let status = |service: &str| HealthCheckRequest {
            service: service.into(),
        };
        let live = client.check(status(LIVENESS)).await.unwrap().into_inner();
        assert_eq!(live.status, Wire::Serving as i32);
        let ready = client.check(status("")).await.unwrap().into_inner();
        assert_eq!(ready.status, Wire::NotServing as i32);
    }

    /// Accepted connections write without Nagle's delay.
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        use tokio_stream::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let server_side = accepted.next().await.unwrap().unwrap();
        assert!(server_side.nodelay().unwrap());
    }
}
