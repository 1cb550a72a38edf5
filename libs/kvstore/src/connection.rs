//! The connection layer under both stores: one Redis connection per process, shared by
//! every clone, that connects lazily, reconnects on loss and retries a command whose
//! connection broke. Every Redis operation of the stores goes through
//! [`RedisConnection::retried`], so this is the one place that knows how the process
//! reaches Redis.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, IntoConnectionInfo};

use crate::{Error, Result, metrics};

/// The connection a store's commands run on: a clone shares the one connection.
pub(crate) type Connection = ConnectionManager;

/// What a Redis connection needs beyond its URL.
#[derive(Default)]
pub struct RedisSecrets {
    /// The password (with the URL's user, if any), read from a file or the environment.
    pub password: Option<String>,
    /// PEM CA certificate of a `rediss://` server, instead of the system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

/// A Redis deployment as both stores reach it. Cloning is cheap and shares the
/// connection.
#[derive(Clone)]
pub struct RedisConnection(Arc<Shared>);

/// What every clone of a [`RedisConnection`] shares.
struct Shared {
    client: redis::Client,
    connection: Connection,
}

impl RedisConnection {
    /// Redis at `url` (`redis://host:port/db`, or `rediss://` for TLS), with a password
    /// kept out of the URL and, for `rediss://`, the CA the server's certificate must chain
    /// to (default: the system's roots). Connects lazily; each command times out instead
    /// of hanging.
    pub fn open(url: &str, secrets: RedisSecrets) -> Result<Self> {
        // The URL may carry a password: errors name neither.
        let invalid = |e: redis::RedisError| {
            Error::Unavailable(format!("invalid Redis URL ({:?})", e.kind()))
        };
        let mut info = url.into_connection_info().map_err(invalid)?;
        if let Some(password) = secrets.password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match secrets.ca_pem {
            Some(root_cert) => {
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(info, certs)
            }
            None => redis::Client::open(info),
        }
        .map_err(invalid)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self(Arc::new(Shared { client, connection })))
    }

    /// A connection of its own, for a command that blocks the server's answer for up to
    /// `block` (on the shared connection it would hold up every other command).
    pub(crate) async fn dedicated(&self, block: Duration) -> Result<MultiplexedConnection> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(block + Duration::from_secs(5)));
        let client = &self.0.client;
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> Result<()> {
        let _: String = self
            .retried("ping", |mut con| async move {
                redis::cmd("PING").query_async(&mut con).await
            })
            .await?;
        Ok(())
    }

    /// Runs `call` on the shared connection, and again (twice at most, after 50 then
    /// 200 ms) when the connection broke: after a Redis restart the first command on
    /// the old connection fails while the manager reconnects. Every call of the stores
    /// may run twice: reads, and scripts that compare before they write (a repeated
    /// commit finds its own write as the stored record, which its callers treat as
    /// committed by another writer, with the same tokens). Measured as operation `op`.
    pub(crate) async fn retried<T, F, Fut>(
        &self,
        op: &'static str,
        call: F,
    ) -> redis::RedisResult<T>
    where
        F: Fn(Connection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        let mut attempt = 0;
        loop {
            match call(self.0.connection.clone()).await {
                Err(e) if attempt < 2 && broken_connection(&e) => {
                    tracing::info!(error = %e, "Redis connection broke; trying again");
                    metrics::retried(op);
                    tokio::time::sleep(pause).await;
                    pause *= 4;
                    attempt += 1;
                }
                other => {
                    metrics::operation(op, started, other.is_ok());
                    return other;
                }
            }
        }
    }
}

/// Whether `e` is a lost or refused connection, rather than an answer.
fn broken_connection(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error()
}

/// A script's reply that is not what the script returns.
pub(crate) fn corrupt(e: redis::ParsingError) -> Error {
    Error::Corrupt(format!("store reply: {e}"))
}
