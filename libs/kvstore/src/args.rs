//! The store's command-line and environment settings, one group for every binary.

use std::time::Duration;

use crate::{Result, Store, StoreConfig};

/// Where sessions are stored: `--redis` (else the in-memory store), the key prefix and
/// the TTL.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Redis URL of the shared store (`redis://host:port/db`); default: in memory.
    #[arg(long, env = "BD3LM_REDIS_URL", value_name = "URL")]
    pub redis: Option<String>,
    /// Prefix of every store key.
    #[arg(long, env = "BD3LM_STORE_PREFIX", default_value = "bd3lm")]
    pub store_prefix: String,
    /// Seconds a session lives after its last write.
    #[arg(long, env = "BD3LM_STORE_TTL_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub store_ttl_secs: u64,
}

impl StoreArgs {
    /// The key prefix and TTL.
    pub fn config(&self) -> StoreConfig {
        StoreConfig {
            prefix: self.store_prefix.clone(),
            ttl: Duration::from_secs(self.store_ttl_secs),
        }
    }

    /// The Redis store when `--redis` is given, else an in-memory one.
    pub fn open(&self) -> Result<Store> {
        match &self.redis {
            Some(url) => Store::redis(url, self.config()),
            None => Ok(Store::memory(self.config())),
        }
    }

    /// A store shared between processes: `--redis` is required.
    pub fn open_shared(&self) -> Result<Store> {
        match &self.redis {
            Some(url) => Store::redis(url, self.config()),
            None => Err(crate::Error::Unavailable(
                "--redis (or BD3LM_REDIS_URL) is required: separate processes share \
                 sessions through Redis"
                    .into(),
            )),
        }
    }

    /// What the store is, for a start-up line: never the URL, which may hold a password.
    pub fn describe(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "memory"
        }
    }
}
