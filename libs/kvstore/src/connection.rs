//! The connection layer under both stores: one connection per process to one Redis or to
//! a Redis Cluster, shared by every clone, that connects lazily, reconnects on loss and
//! retries a command whose connection broke. Every Redis operation of the stores goes
//! through [`RedisConnection::retried`], so this is the one place that knows how the
//! process reaches Redis.
//!
//! On a cluster, every command and script of the stores names keys of one hash slot (a
//! session's keys share its `{id}` tag, the jobs' keys `{jobs}`, the registry's
//! `{registry}`), so each runs whole on the master of that slot; the cluster client
//! follows MOVED and ASK redirections and refreshes the slot map when it changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
use redis::{AsyncConnectionConfig, Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use crate::{Error, Result, metrics};

/// The connection a store's commands run on: a clone shares the one connection.
#[derive(Clone)]
pub(crate) enum Connection {
    /// One Redis server, through a manager that reconnects.
    Single(ConnectionManager),
    /// One Redis server, on a connection of one caller's own that is not re-established.
    Own(MultiplexedConnection),
    /// A Redis Cluster, each command routed to the master of its keys' slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Own(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Own(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Own(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// How a new connection reaches the deployment (built once per process: the size of a
/// cluster client's settings does not matter).
#[allow(clippy::large_enum_variant)]
enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

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
    client: Client,
    connection: Connection,
    /// How long a command rides out a broken connection before its error stands.
    outage: Duration,
}

/// What one Redis' restart takes from a command: two tries again, after 50 then 200 ms.
const RESTART_OUTAGE: Duration = Duration::from_millis(300);

/// What a cluster's failover takes from a command: the replicas' wait for the master
/// (`cluster-node-timeout`, 15 s by default), their election, and the client's new slot
/// map.
const FAILOVER_OUTAGE: Duration = Duration::from_secs(20);

/// How long a connection may take to open, and a command to be answered.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The URL's error without the URL, which may carry a password.
fn invalid(e: redis::RedisError) -> Error {
    Error::Unavailable(format!("invalid Redis URL ({:?})", e.kind()))
}

impl RedisConnection {
    /// Redis at `url` (`redis://host:port/db`, or `rediss://` for TLS), with a password
    /// kept out of the URL and, for `rediss://`, the CA the server's certificate must chain
    /// to (default: the system's roots). Connects lazily; each command times out instead
    /// of hanging.
    pub fn open(url: &str, secrets: RedisSecrets) -> Result<Self> {
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
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self(Arc::new(Shared {
            client: Client::Single(client),
            connection: Connection::Single(connection),
            outage: RESTART_OUTAGE,
        })))
    }

    /// A Redis Cluster reached through any of its `nodes` (`redis://host:port` or
    /// `rediss://`, all of one scheme), with the secrets of [`RedisConnection::open`];
    /// the rest of the cluster is found from them. Connects lazily.
    pub fn open_cluster(nodes: &[String], secrets: RedisSecrets) -> Result<Self> {
        if nodes.is_empty() {
            return Err(Error::Unavailable("no Redis Cluster node given".into()));
        }
        let infos = nodes
            .iter()
            .map(|url| url.as_str().into_connection_info().map_err(invalid))
            .collect::<Result<Vec<_>>>()?;
        let mut builder = ClusterClient::builder(infos)
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(4)
            .min_retry_wait(50)
            .max_retry_wait(1_000);
        if let Some(password) = secrets.password {
            builder = builder.password(password);
        }
        if let Some(root_cert) = secrets.ca_pem {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            });
        }
        let client = builder.build().map_err(invalid)?;
        let config = ClusterConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        let connection = client.get_pending_async_connection_with_config(config);
        Ok(Self(Arc::new(Shared {
            client: Client::Cluster(client),
            connection: Connection::Cluster(connection),
            outage: FAILOVER_OUTAGE,
        })))
    }

    /// A connection of its own, for a command that blocks the server's answer for up to
    /// `block` (on the shared connection it would hold up every other command).
    pub(crate) async fn dedicated(&self, block: Duration) -> Result<Connection> {
        let response = block + RESPONSE_TIMEOUT;
        Ok(match &self.0.client {
            Client::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(response));
                let connection = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Connection::Own(connection)
            }
            Client::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(CONNECT_TIMEOUT)
                    .set_response_timeout(response);
                Connection::Cluster(client.get_async_connection_with_config(config).await?)
            }
        })
    }

    /// The server's `maxmemory-policy` (a cluster's: one node's, asked at random); `None`
    /// when it cannot be read (managed services and ACLs often refuse `CONFIG`).
    pub async fn eviction_policy(&self) -> Option<String> {
        let mut con = self.0.connection.clone();
        let reply: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query_async(&mut con)
            .await;
        reply.ok()?.into_iter().nth(1)
    }

    /// Waits up to `timeout` until `replicas` replicas of the master holding `key` have
    /// every write this process sent that master (Redis' `WAIT`, routed to the key's
    /// slot on a cluster); how many have.
    pub(crate) async fn wait_for_replicas(
        &self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout.as_millis() as u64);
        let acked: u32 = self
            .retried("wait_replicas", |con| {
                let wait = wait.clone();
                async move {
                    match con {
                        Connection::Cluster(mut cluster) => {
                            let slot = Route::with_slot(Slot::for_key(key), SlotAddr::Master);
                            let route =
                                RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(slot));
                            let reply = cluster.route_command(wait, route).await?;
                            Ok(redis::from_redis_value(reply)?)
                        }
                        mut one => wait.query_async(&mut one).await,
                    }
                }
            })
            .await?;
        Ok(acked)
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

    /// Runs `call` on the shared connection, and again while the connection is broken or
    /// the cluster is between masters, within the outage a deployment rides out (pauses
    /// of 50 ms, 200 ms, then up to 1 s): one Redis' restart (the first command on the old
    /// connection fails while the manager reconnects) or a cluster's failover. Every call
    /// of the stores may run more than once: reads, and scripts that compare before they
    /// write (a repeated commit finds its own write as the stored record, which its
    /// callers treat as committed by another writer, with the same tokens). Measured as
    /// operation `op`.
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
        loop {
            match call(self.0.connection.clone()).await {
                Err(e) if transient(&e) && started.elapsed() + pause <= self.0.outage => {
                    tracing::info!(error = %e, "Redis unreachable; trying again");
                    metrics::retried(op);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 4).min(Duration::from_secs(1));
                }
                other => {
                    metrics::operation(op, started, other.is_ok());
                    return other;
                }
            }
        }
    }
}

/// Whether `e` is a lost or refused connection or a cluster between masters, rather than
/// an answer. During a failover the nodes redirect to the dead master (MOVED) until a
/// replica takes over. (The stores use no MULTI transactions: a transaction that meets a
/// redirection only aborts, and the cluster client neither follows it nor refreshes its
/// slot map, so a moved slot failed its reads until something else did.)
fn transient(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    let between_masters = matches!(
        e.kind(),
        ErrorKind::ClusterConnectionNotFound
            | ErrorKind::Server(
                ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
            )
    );
    between_masters || e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error()
}

/// A script's reply that is not what the script returns.
pub(crate) fn corrupt(e: redis::ParsingError) -> Error {
    Error::Corrupt(format!("store reply: {e}"))
}
