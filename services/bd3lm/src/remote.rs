//! A connection to a running system (`bd3lm serve`, a coordinator): its address, API key
//! and TLS, shared by the client commands.

use anyhow::Context;
use bd3lm_proto::auth::Bearer;
use bd3lm_proto::tls::TlsFiles;
use clap::Args;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A channel whose calls carry the API key.
pub type Authorized = InterceptedService<Channel, Bearer>;

/// Where the server is and how to reach it.
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// The server at HOST:PORT (`bd3lm serve`, the coordinator).
    #[arg(
        long,
        env = "BD3LM_SERVER",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:50051"
    )]
    pub addr: String,
    #[command(flatten)]
    pub credentials: Credentials,
}

impl RemoteArgs {
    /// Connects to the server.
    pub async fn connect(&self) -> anyhow::Result<Authorized> {
        self.credentials.connect(&self.addr).await
    }
}

/// What a client shows a server: its API key and TLS.
#[derive(Debug, Clone, Args)]
pub struct Credentials {
    /// The API key, sent as `authorization: Bearer <key>` (prefer the environment
    /// variable: a flag shows in the process list).
    #[arg(
        long,
        env = "BD3LM_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// TLS towards the server (its CA; a certificate and key when it asks for one).
    #[command(flatten)]
    pub tls: TlsFiles,
}

impl Credentials {
    /// Connects to the server at `addr` with these credentials.
    pub async fn connect(&self, addr: &str) -> anyhow::Result<Authorized> {
        connect(addr, self.api_key.as_deref(), &self.tls).await
    }
}

/// Connects to `addr` (TLS when `tls` says so), with `api_key` on every call.
pub async fn connect(
    addr: &str,
    api_key: Option<&str>,
    tls: &TlsFiles,
) -> anyhow::Result<Authorized> {
    let host = addr.rsplit_once("://").map_or(addr, |(_, rest)| rest);
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    let tls = tls.client(name)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}"))
        .with_context(|| format!("the address {addr}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let bearer = Bearer::new(api_key).context("--api-key: printable ASCII without spaces")?;
    Ok(InterceptedService::new(channel, bearer))
}

/// A refused call as one line: its code and message.
pub fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}
