//! The store's command-line and environment settings, one group for every binary.

use std::time::Duration;

use crate::{RedisConnection, RedisSecrets, Result, StoreConfig, Stores, SyncReplicas};

/// Where sessions are stored: `--redis` (else the in-memory store), the key prefix and
/// the TTL. Its `Debug` and `--help` never show the URL, which may hold a password.
#[derive(Clone, clap::Args)]
pub struct StoreArgs {
    /// Redis URL of the shared store (`redis://[user:password@]host:port/db`); default: in
    /// memory. Prefer the environment variable: a flag shows in the process list.
    #[arg(
        long,
        env = "BD3LM_REDIS_URL",
        value_name = "URL",
        hide_env_values = true,
        group = "redis_target"
    )]
    pub redis: Option<String>,
    /// Seed nodes of a Redis Cluster holding the shared store, comma-separated
    /// (`redis://host:port` or `rediss://`; the rest of the cluster is found from them),
    /// instead of --redis.
    #[arg(
        long,
        env = "BD3LM_REDIS_CLUSTER",
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        hide_env_values = true,
        group = "redis_target"
    )]
    pub redis_cluster: Vec<String>,
    /// File holding the Redis password (ACL user: in the URL), so that neither the URL
    /// nor the process list shows it.
    #[arg(
        long,
        env = "BD3LM_REDIS_PASSWORD_FILE",
        value_name = "FILE",
        requires = "redis_target"
    )]
    pub redis_password_file: Option<std::path::PathBuf>,
    /// PEM CA certificate of a `rediss://` server (default: the system's roots).
    #[arg(
        long,
        env = "BD3LM_REDIS_CA",
        value_name = "FILE",
        requires = "redis_target"
    )]
    pub redis_ca: Option<std::path::PathBuf>,
    /// Prefix of every store key.
    #[arg(long, env = "BD3LM_STORE_PREFIX", default_value = "bd3lm")]
    pub store_prefix: String,
    /// Seconds a session lives after its last write.
    #[arg(long, env = "BD3LM_STORE_TTL_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub store_ttl_secs: u64,
    /// Replicas that must acknowledge every session write (Redis' WAIT after it) before
    /// the block counts as committed; 0: Redis' asynchronous replication alone.
    #[arg(
        long,
        env = "BD3LM_REDIS_SYNC_REPLICAS",
        default_value_t = 0,
        requires = "redis_target"
    )]
    pub redis_sync_replicas: u32,
    /// Milliseconds a session write waits for those replicas before it stands anyway.
    #[arg(long, env = "BD3LM_REDIS_SYNC_TIMEOUT_MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=4_000))]
    pub redis_sync_timeout_ms: u64,
}

impl std::fmt::Debug for StoreArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreArgs")
            .field("redis", &self.redis.as_ref().map(|_| "<redacted>"))
            .field("redis_cluster", &self.redis_cluster.len())
            .field("redis_password_file", &self.redis_password_file)
            .field("redis_ca", &self.redis_ca)
            .field("store_prefix", &self.store_prefix)
            .field("store_ttl_secs", &self.store_ttl_secs)
            .field("redis_sync_replicas", &self.redis_sync_replicas)
            .field("redis_sync_timeout_ms", &self.redis_sync_timeout_ms)
            .finish()
    }
}

impl StoreArgs {
    /// The key prefix, the TTL and the replicas a write waits for.
    pub fn config(&self) -> StoreConfig {
        StoreConfig {
            prefix: self.store_prefix.clone(),
            ttl: Duration::from_secs(self.store_ttl_secs),
            sync_replicas: (self.redis_sync_replicas > 0).then(|| SyncReplicas {
                replicas: self.redis_sync_replicas,
                timeout: Duration::from_millis(self.redis_sync_timeout_ms),
            }),
        }
    }

    /// The stores on Redis (one server or a cluster) when one is given, else in memory.
    pub fn open(&self) -> Result<Stores> {
        let redis = match (&self.redis, self.redis_cluster.as_slice()) {
            (Some(url), _) => RedisConnection::open(url, self.secrets()?)?,
            (None, []) => return Ok(Stores::memory(self.config())),
            (None, nodes) => RedisConnection::open_cluster(nodes, self.secrets()?)?,
        };
        Ok(Stores::redis(&redis, self.config()))
    }

    /// The password and CA files, read.
    fn secrets(&self) -> Result<RedisSecrets> {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| crate::Error::Unavailable(format!("reading {}: {e}", path.display())))
        };
        let password = match &self.redis_password_file {
            Some(path) => Some(String::from_utf8_lossy(&read(path)?).trim().to_string()),
            None => None,
        };
        let ca_pem = self.redis_ca.as_deref().map(read).transpose()?;
        Ok(RedisSecrets { password, ca_pem })
    }

    /// Stores shared between processes: `--redis` or `--redis-cluster` is required.
    pub fn open_shared(&self) -> Result<Stores> {
        if self.redis.is_none() && self.redis_cluster.is_empty() {
            return Err(crate::Error::Unavailable(
                "--redis or --redis-cluster (or BD3LM_REDIS_URL, BD3LM_REDIS_CLUSTER) is \
                 required: separate processes share sessions through Redis"
                    .into(),
            ));
        }
        self.open()
    }

    /// What the store is, for a start-up line: never the URL, which may hold a password.
    pub fn describe(&self) -> &'static str {
        match (&self.redis, self.redis_cluster.is_empty()) {
            (Some(_), _) => "redis",
            (None, false) => "redis-cluster",
            (None, true) => "memory",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        store: StoreArgs,
    }

    /// Held by the tests that parse flags, which read the environment one of them sets.
    static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// One Redis or one cluster, never both; the password file and synchronous
    /// replication go with either.
    #[test]
    fn a_store_is_one_redis_or_one_cluster() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let parse = |flags: &[&str]| Cli::try_parse_from([&["x"], flags].concat());
        let nodes = "redis://10.0.0.1:7000,redis://10.0.0.2:7000";
        let args = parse(&["--redis-cluster", nodes]).unwrap().store;
        assert_eq!(args.redis_cluster.len(), 2);
        assert_eq!(args.describe(), "redis-cluster");
        assert!(parse(&["--redis-cluster", nodes, "--redis", "redis://h/0"]).is_err());
        assert!(parse(&["--redis-cluster", nodes, "--redis-password-file", "p"]).is_ok());
        assert!(parse(&["--redis-password-file", "p"]).is_err());
        assert!(
            parse(&["--redis-sync-replicas", "1"]).is_err(),
            "needs a Redis"
        );
        let sync = parse(&["--redis-cluster", nodes, "--redis-sync-replicas", "1"]).unwrap();
        let wait = sync.store.config().sync_replicas.unwrap();
        assert_eq!(
            (wait.replicas, wait.timeout),
            (1, Duration::from_millis(100))
        );
        assert_eq!(args.config().sync_replicas, None, "asynchronous by default");
    }

    /// A password in the URL shows neither in `Debug` nor in `--help`.
    #[test]
    fn the_url_never_shows() {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let url = "redis://app:s3cret-pw@10.0.0.7:6379/0";
        let args = Cli::try_parse_from(["x", "--redis", url]).unwrap().store;
        assert!(!format!("{args:?}").contains("s3cret"));
        // SAFETY: the tests that read the environment hold `ENV`.
        unsafe { std::env::set_var("BD3LM_REDIS_URL", url) };
        let help = Cli::try_parse_from(["x", "--help"])
            .unwrap_err()
            .to_string();
        unsafe { std::env::remove_var("BD3LM_REDIS_URL") };
        assert!(
            help.contains("BD3LM_REDIS_URL") && !help.contains("s3cret"),
            "{help}"
        );
    }
}
