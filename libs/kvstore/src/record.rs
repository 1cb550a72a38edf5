//! The session record: the source of truth of a session. Tokens are committed here; KV
//! blobs are a cache that can always be rebuilt from them.
//!
//! A record is stored in two parts: its metadata (JSON, everything but the tokens) and
//! its tokens (little-endian u32s, only ever appended), under a version that changes
//! with every write: every write compares the version it read and fails if it moved.

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
    /// Every token: committed blocks, then fixed prompt tokens not yet committed. Writes
    /// only ever append to them.
    #[serde(skip)]
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
    /// The id of the API key that created the session (a hash, never the key); `None`
    /// when the API was open. Only that key reads, continues or deletes the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The registry version of the model the session's last block ran on (`None` for a
    /// checkpoint directory's model, or before its first block): the workers keep the
    /// session on it while they have it loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<u64>,
    /// The stored version this record was read at (0 before it is first stored).
    #[serde(skip)]
    pub version: u64,
}

/// What a writer read: the version its write replaces and how many tokens were stored
/// then. A write whose base is no longer the stored one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    /// The version read.
    pub version: u64,
    /// The tokens stored at that version.
    pub tokens: usize,
}

impl SessionRecord {
    /// What a write of a record derived from this one replaces.
    pub fn base(&self) -> Base {
        Base {
            version: self.version,
            tokens: self.tokens.len(),
        }
    }

    /// The metadata part: everything but the tokens and the version.
    pub fn meta_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a session record serialises")
    }

    /// The record stored as `meta` and `tokens` at `version`. Anything that does not
    /// decode is [`Error::Corrupt`], never a panic.
    pub fn from_parts(meta: &[u8], tokens: &[u8], version: u64) -> Result<Self> {
        let mut record = Self::from_meta(meta)?;
        record.tokens = decode_tokens(tokens)?;
        record.version = version;
        if record.prompt_len > record.tokens.len() || record.returned > record.tokens.len() {
            return Err(Error::Corrupt(format!(
                "session record: {} tokens, prompt {}, returned {}",
                record.tokens.len(),
                record.prompt_len,
                record.returned
            )));
        }
        Ok(record)
    }

    /// The metadata part alone, without tokens or version.
    pub(crate) fn from_meta(meta: &[u8]) -> Result<Self> {
        serde_json::from_slice(meta).map_err(|e| Error::Corrupt(format!("session record: {e}")))
    }
}

/// Whether `id` is a session id as the coordinator makes them (`^[0-9a-f]{32}$`): checked
/// before any store access, so no other text ever reaches a key.
pub fn is_session_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A session id as logs and spans show it: its first 8 hex digits, enough to follow one
/// session through the logs, too few to act on it.
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Tokens as stored: little-endian u32s.
pub fn encode_tokens(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn decode_tokens(bytes: &[u8]) -> Result<Vec<u32>> {
    if !bytes.len().is_multiple_of(4) {
        return Err(Error::Corrupt(format!(
            "session tokens: {} bytes is not a whole number of tokens",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unknown sampler in a stored record is an error, never a silent default.
    #[test]
    fn records_with_unknown_samplers_are_corrupt() {
        let mut record = crate::contract::record("s");
        record.version = 5;
        let (meta, tokens) = (record.meta_bytes(), encode_tokens(&record.tokens));
        assert_eq!(
            SessionRecord::from_parts(&meta, &tokens, 5).unwrap(),
            record
        );
        let text = String::from_utf8(meta).unwrap();
        let unknown = text.replace("first-hitting", "beam-search");
        assert_ne!(unknown, text);
        let err = SessionRecord::from_parts(unknown.as_bytes(), &tokens, 5).unwrap_err();
        assert!(matches!(err, Error::Corrupt(_)), "{err}");
    }

    /// Mutated metadata and tokens decode as errors or records, never panics.
    #[test]
    fn fuzzed_records_never_panic() {
        let mut record = crate::contract::record("s");
        record.owner = Some("0123456789abcdef".into());
        let meta = record.meta_bytes();
        let tokens = encode_tokens(&record.tokens);
        let budget = std::time::Duration::from_secs(1);
        bd3lm_bytes::fuzz::fuzz(
            "session record meta",
            std::slice::from_ref(&meta),
            budget,
            |m| {
                let _ = SessionRecord::from_parts(m, &tokens, 1);
            },
        );
        bd3lm_bytes::fuzz::fuzz(
            "session record tokens",
            std::slice::from_ref(&tokens),
            budget,
            |t| {
                let _ = SessionRecord::from_parts(&meta, t, 1);
            },
        );
    }

    /// Tokens that are not whole u32s, or fewer than the prompt, are corrupt.
    #[test]
    fn records_with_bad_tokens_are_corrupt() {
        let record = crate::contract::record("s");
        let meta = record.meta_bytes();
        let tokens = encode_tokens(&record.tokens);
        for bad in [&tokens[..tokens.len() - 1], &tokens[..4]] {
            let err = SessionRecord::from_parts(&meta, bad, 1).unwrap_err();
            assert!(matches!(err, Error::Corrupt(_)), "{err}");
        }
    }
}
