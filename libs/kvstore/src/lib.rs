//! Where sessions live between blocks: session records, KV blobs, and the stores that
//! hold them.
//!
//! * [`blob`]: the container of one committed block's keys and values (model id, weights
//!   fingerprint, block index, checksum around the model's self-describing payload);
//! * [`record`]: a session's tokens, seed and parameters: the source of truth;
//! * [`store`]: the [`Store`] with an in-memory implementation (the embedded default) and a
//!   Redis one (one key prefix, TTL refreshed on write, pipelined reads, reconnection).
//!
//! This crate does not link the network: the coordinator uses it too.

pub mod blob;
mod error;
pub mod record;
pub mod store;

pub use blob::BlockBlob;
pub use error::{Error, Result};
pub use record::{SamplingRecord, SessionRecord};
pub use store::{CommitOutcome, Store, StoreConfig};

/// 64-bit FNV-1a: a checksum against corruption in transit and at rest (not an
/// authenticator).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
