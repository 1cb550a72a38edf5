//! The session record: the source of truth of a session. Tokens are committed here; KV
//! blobs are a cache that can always be rebuilt from them.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Sampling parameters as stored (the diffusion library's, without its types).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingRecord {
    /// `ddpm`, `first-hitting` or `confidence`.
    pub sampler: String,
    /// Denoising steps per block.
    pub steps: usize,
    /// Confidence threshold.
    pub threshold: f64,
    /// Softmax temperature.
    pub temperature: f64,
    /// Nucleus mass.
    pub top_p: f64,
    /// Top-k, if any.
    pub top_k: Option<usize>,
    /// Greedy decoding.
    pub greedy: bool,
}

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
    pub sampling: SamplingRecord,
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
