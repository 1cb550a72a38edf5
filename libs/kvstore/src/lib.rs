//! Where sessions and training jobs live between requests: two stores over one
//! connection layer, and the formats they hold.
//!
//! * [`SessionStore`] ([`sessions`]): session records, tokens, KV blobs, leases,
//!   tombstones and per-key session counts;
//! * [`JobStore`] ([`jobs`]): the training service's job records, job queue and the
//!   model registry's records;
//! * each with an in-memory backend (the embedded default) and a Redis one, both over
//!   [`RedisConnection`], the one place that knows how the process reaches Redis (lazy
//!   connection, reconnection, retries, metrics);
//! * [`blob`]: the container of one committed block's keys and values (model id, weights
//!   fingerprint, block index, checksum around the model's self-describing payload);
//! * [`record`]: a session's tokens, seed and parameters: the source of truth.
//!
//! Its errors are its own ([`Error`]): it knows nothing of gRPC, and each service maps
//! them to statuses (`bd3lm_proto::status`).
#![warn(missing_docs)]

#[cfg(feature = "clap")]
mod args;
pub mod blob;
mod connection;
#[cfg(any(test, feature = "contract"))]
pub mod contract;
mod error;
pub mod eviction;
pub mod jobs;
pub mod metrics;
pub mod record;
pub mod sessions;

use std::time::Duration;

#[cfg(feature = "clap")]
pub use args::StoreArgs;

pub use blob::BlockBlob;
pub use connection::{RedisConnection, RedisSecrets};
pub use error::{Error, Result};
pub use eviction::Eviction;
pub use jobs::{ChangeCursor, JobClaim, JobStore, Quota, Retirement, Revised, Submitted};
pub use record::SessionRecord;
pub use sessions::{CommitOutcome, PrefixScope, SessionStore};

/// Milliseconds since the epoch on this process's clock.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Settings common to both stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Prefix of every key.
    pub prefix: String,
    /// Lifetime of a session's keys after their last write (the job store's keys never
    /// expire).
    pub ttl: Duration,
    /// Replicas that must have a session's write before it counts as done; `None`:
    /// Redis' own asynchronous replication.
    pub sync_replicas: Option<SyncReplicas>,
}

/// Synchronous replication of session writes (Redis' `WAIT` after each): a master that
/// dies then loses no write its replicas acknowledged. Redis still replicates
/// asynchronously beneath, so a write whose replicas did not answer in time stands
/// (counted in `bd3lm_store_replication_shortfalls_total`), as it would without this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncReplicas {
    /// How many replicas must acknowledge.
    pub replicas: u32,
    /// How long a write waits for them.
    pub timeout: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            prefix: "bd3lm".into(),
            ttl: Duration::from_secs(24 * 3600),
            sync_replicas: None,
        }
    }
}

/// Both stores of one deployment, on one backend.
#[derive(Clone)]
pub struct Stores {
    /// Sessions and their KV state.
    pub sessions: SessionStore,
    /// Jobs, their queue and the registry's records.
    pub jobs: JobStore,
}

impl Stores {
    /// Both stores in this process's memory.
    pub fn memory(config: StoreConfig) -> Self {
        Self {
            sessions: SessionStore::memory(config.clone()),
            jobs: JobStore::memory(config),
        }
    }

    /// Both stores on the Redis deployment `redis`, sharing its connection.
    pub fn redis(redis: &RedisConnection, config: StoreConfig) -> Self {
        Self {
            sessions: SessionStore::redis(redis, config.clone()),
            jobs: JobStore::redis(redis, config),
        }
    }
}
