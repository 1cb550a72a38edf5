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

/// A 64-bit FNV-1a-style checksum over 8-byte words, against corruption in transit and
/// at rest (not an authenticator).
pub fn checksum(bytes: &[u8]) -> u64 {
    // Eight bytes per step (a zero-padded tail, then the length): fast enough that the
    // checksum does not bound blob throughput, and any change of one word changes it.
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut words = bytes.chunks_exact(8);
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for word in &mut words {
        hash = (hash ^ u64::from_le_bytes(word.try_into().expect("8 bytes"))).wrapping_mul(PRIME);
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    hash = (hash ^ u64::from_le_bytes(tail)).wrapping_mul(PRIME);
    (hash ^ bytes.len() as u64).wrapping_mul(PRIME)
}
