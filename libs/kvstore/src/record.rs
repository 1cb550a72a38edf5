//! The session record: the source of truth of a session. Tokens are committed here; KV
//! blobs are a cache that can always be rebuilt from them.

use bd3lm_sampling::SamplingParams;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A session as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id.
    pub id: String,
    /// Model the session belongs to.
    pub model_id: String,
    /// Every token: committed blocks, then fixed prompt tokens not yet committed.
    pub tokens: Vec<u32>,
    /// Tokens of the first prompt (whose whole blocks are committed in one pass).
    pub prompt_len: usize,
    /// Blocks committed: their tokens are final and their KV blobs written.
    pub committed_blocks: usize,
    /// Seed of every random draw.
    pub seed: u64,
    /// Sampling parameters of the next blocks.
    pub sampling: SamplingParams,
    /// Tokens returned to the client so far (prompts included); a continuation starts here.
    pub returned: usize,
}

impl SessionRecord {
    /// Serialises the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a session record serialises")
    }

    /// Parses a stored record.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| Error::Corrupt(format!("session record: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unknown sampler in a stored record is an error, never a silent default.
    #[test]
    fn records_with_unknown_samplers_are_corrupt() {
        let record = crate::contract::record("s");
        let bytes = record.to_bytes();
        assert_eq!(SessionRecord::from_bytes(&bytes).unwrap(), record);
        let text = String::from_utf8(bytes).unwrap();
        let unknown = text.replace("first-hitting", "beam-search");
        assert_ne!(unknown, text);
        let err = SessionRecord::from_bytes(unknown.as_bytes()).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err}");
    }
}
