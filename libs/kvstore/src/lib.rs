//! Where sessions live between blocks: session records, KV blobs, and the stores that
//! hold them.
//!
//! * [`blob`]: the container of one committed block's keys and values (model id, weights
//!   fingerprint, block index, checksum around the model's self-describing payload);
//! * [`record`]: a session's tokens, seed and parameters: the source of truth;
//! * [`jobs`]: the training service's job records, job queue and model registry records;
//! * [`store`]: the [`Store`] with an in-memory implementation (the embedded default) and a
//!   Redis one (one key prefix, TTL refreshed on write, pipelined reads, reconnection).
//!
//! This crate does not link the network: the coordinator uses it too.

#[cfg(feature = "clap")]
mod args;
pub mod blob;
#[cfg(any(test, feature = "contract"))]
pub mod contract;
mod error;
pub mod jobs;
pub mod metrics;
pub mod record;
#[cfg(feature = "grpc")]
mod status;
pub mod store;

#[cfg(feature = "clap")]
pub use args::StoreArgs;

pub use blob::BlockBlob;
pub use error::{Error, Result};
pub use jobs::{JobClaim, Revised};
pub use record::SessionRecord;
pub use store::{CommitOutcome, RedisSecrets, Store, StoreConfig};
