//! The KV blob of one committed block.
//!
//! Layout (little endian): magic `BD3KVBLK`, version u32, model id (u16 length + UTF-8),
//! fingerprint (u16 length + UTF-8), block index u64, prefix hash u64, payload (u64
//! length + bytes), and a checksum u64 ([`bd3lm_bytes::checksum`]) of everything before
//! it. The payload is the model library's own self-describing KV segment (dtype, layers,
//! heads, head dim, positions, its checksum).
//!
//! A blob is used only for the session tokens it was computed from: its prefix hash is
//! the [`prefix_hashes`] of the tokens up to the end of its block, compared with the
//! record's before use.

use bd3lm_bytes::Reader;

use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"BD3KVBLK";
const VERSION: u32 = 2;
/// Longest model id or fingerprint a blob holds, in bytes: a worker refuses a longer
/// model id at start-up, since none of its blobs could be read back.
pub const MAX_NAME: usize = 1024;

/// One committed block's keys and values with what identifies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockBlob {
    /// Model that computed them.
    pub model_id: String,
    /// Hash of that model's weights, dtype and configuration: the state's layout.
    pub fingerprint: String,
    /// Index of the block in its session.
    pub block_index: u64,
    /// Hash of the session's tokens up to the end of the block.
    pub prefix_hash: u64,
    /// The model's serialised KV segment.
    pub payload: Vec<u8>,
}

impl BlockBlob {
    /// Encodes the blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            64 + self.model_id.len() + self.fingerprint.len() + self.payload.len(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        for name in [&self.model_id, &self.fingerprint] {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(&self.block_index.to_le_bytes());
        out.extend_from_slice(&self.prefix_hash.to_le_bytes());
        out.extend_from_slice(&(self.payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.payload);
        bd3lm_bytes::seal(out)
    }

    /// Decodes a blob, checking every length against the bytes present and the checksum;
    /// the payload reuses `bytes`' allocation.
    pub fn decode(bytes: Vec<u8>) -> Result<Self> {
        if bytes.len() < MAGIC.len() + 4 + 2 + 2 + 8 + 8 + 8 + 8 {
            return Err(Error::Corrupt("KV blob too short".into()));
        }
        let body = bd3lm_bytes::unseal(&bytes)
            .ok_or_else(|| Error::Corrupt("KV blob checksum mismatch".into()))?;
        let mut r = Reader::new(body);
        if r.take(8).map_err(truncated)? != MAGIC {
            return Err(Error::Corrupt("not a KV blob (bad magic)".into()));
        }
        let version = r.u32().map_err(truncated)?;
        if version != VERSION {
            return Err(Error::Corrupt(format!(
                "KV blob version {version} is not supported"
            )));
        }
        let model_id = name(&mut r)?;
        let fingerprint = name(&mut r)?;
        let block_index = r.u64().map_err(truncated)?;
        let prefix_hash = r.u64().map_err(truncated)?;
        let len = r.u64().map_err(truncated)?;
        if len != r.remaining() as u64 {
            return Err(Error::Corrupt(format!(
                "KV blob payload: header says {len} bytes, {} present",
                r.remaining()
            )));
        }
        let start = body.len() - r.remaining();
        let end = body.len();
        // The payload keeps the blob's allocation: megabytes per session, not copied.
        let mut payload = bytes;
        payload.truncate(end);
        payload.drain(..start);
        Ok(Self {
            model_id,
            fingerprint,
            block_index,
            prefix_hash,
            payload,
        })
    }
}

/// For each block of `blocks`, the hash of `tokens` up to its end (`block_size` tokens
/// per block), in one pass; `None` when `tokens` ends before the last of them.
pub fn prefix_hashes(
    tokens: &[u32],
    block_size: usize,
    blocks: std::ops::Range<usize>,
) -> Option<Vec<u64>> {
    let end = blocks.end.checked_mul(block_size)?;
    let tokens = tokens.get(..end)?;
    let mut sum = bd3lm_bytes::Checksum::new();
    let mut hashes = Vec::with_capacity(blocks.len());
    for (b, chunk) in tokens.chunks(block_size.max(1)).enumerate() {
        let bytes: Vec<u8> = chunk.iter().flat_map(|t| t.to_le_bytes()).collect();
        sum.update(&bytes);
        if blocks.contains(&b) {
            hashes.push(sum.finish());
        }
    }
    Some(hashes)
}

/// The addresses under which the whole blocks `0..blocks` of a first prompt are shared
/// between sessions (the workers' prefix caches, the store's prefix blobs, the
/// coordinator's routing): each block's [`prefix_hashes`], salted by the session's
/// `owner` (its API key) so that one tenant never gets another's blocks, nor learns from
/// a faster first block that another sent the same prompt. Sessions without an owner
/// share among themselves. `None` when `tokens` ends before the last block.
pub fn shared_prefix_addresses(
    tokens: &[u32],
    block_size: usize,
    blocks: usize,
    owner: Option<&str>,
) -> Option<Vec<u64>> {
    let hashes = prefix_hashes(tokens, block_size, 0..blocks)?;
    let Some(owner) = owner else {
        return Some(hashes);
    };
    let salt = bd3lm_bytes::checksum(owner.as_bytes()).to_le_bytes();
    let salted = |hash: u64| {
        let mut sum = bd3lm_bytes::Checksum::new();
        sum.update(&salt);
        sum.update(&hash.to_le_bytes());
        sum.finish()
    };
    Some(hashes.into_iter().map(salted).collect())
}

fn truncated(e: bd3lm_bytes::Truncated) -> Error {
    Error::Corrupt(format!("KV blob {e}"))
}

/// A u16-length-prefixed UTF-8 name of at most [`MAX_NAME`] bytes.
fn name(r: &mut Reader<'_>) -> Result<String> {
    let len = r.u16().map_err(truncated)? as usize;
    if len > MAX_NAME {
        return Err(Error::Corrupt(format!("KV blob name of {len} bytes")));
    }
    String::from_utf8(r.take(len).map_err(truncated)?.to_vec())
        .map_err(|_| Error::Corrupt("KV blob name is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> BlockBlob {
        BlockBlob {
            model_id: "demo".into(),
            fingerprint: "abc123".into(),
            block_index: 7,
            prefix_hash: 0xfeed,
            payload: (0..200u8).collect(),
        }
    }

    #[test]
    fn round_trips() {
        assert_eq!(BlockBlob::decode(blob().encode()).unwrap(), blob());
    }

    /// Every truncation and every single-bit flip is an error, never a panic.
    #[test]
    fn hostile_bytes_are_errors() {
        let bytes = blob().encode();
        for cut in 0..bytes.len() {
            assert!(
                BlockBlob::decode(bytes[..cut].to_vec()).is_err(),
                "cut {cut}"
            );
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(BlockBlob::decode(b.clone()).is_err(), "flip {i}");
        }
    }

    /// Mutated blobs, sealed again so that the parser behind the checksum meets them,
    /// decode as errors or blobs, never panics.
    #[test]
    fn fuzzed_blobs_never_panic() {
        let mut empty = blob();
        empty.payload.clear();
        let bodies: Vec<Vec<u8>> = [blob().encode(), empty.encode()]
            .into_iter()
            .map(|b| b[..b.len() - 8].to_vec())
            .collect();
        let budget = std::time::Duration::from_secs(2);
        bd3lm_bytes::fuzz::fuzz("kv blob decode", &bodies, budget, |body| {
            let _ = BlockBlob::decode(bd3lm_bytes::seal(body.to_vec()));
            let _ = BlockBlob::decode(body.to_vec());
        });
    }

    /// A block's prefix hash covers every token before its end and none after.
    #[test]
    fn prefix_hashes_follow_the_tokens_up_to_each_block() {
        let tokens: Vec<u32> = (0..12).collect();
        let all = prefix_hashes(&tokens, 4, 0..3).unwrap();
        assert_eq!(prefix_hashes(&tokens, 4, 1..3).unwrap(), all[1..]);
        assert_eq!(prefix_hashes(&tokens[..8], 4, 0..2).unwrap(), all[..2]);
        assert_eq!(prefix_hashes(&tokens, 4, 0..4), None);
        let mut changed = tokens.clone();
        changed[5] = 99;
        let other = prefix_hashes(&changed, 4, 0..3).unwrap();
        assert_eq!(other[0], all[0]);
        assert!(other[1] != all[1] && other[2] != all[2]);
    }

    /// Addresses follow the tokens as their hashes do, and differ between owners.
    #[test]
    fn shared_addresses_are_per_owner() {
        let tokens: Vec<u32> = (0..12).collect();
        let plain = prefix_hashes(&tokens, 4, 0..3).unwrap();
        assert_eq!(shared_prefix_addresses(&tokens, 4, 3, None).unwrap(), plain);
        let a = shared_prefix_addresses(&tokens, 4, 3, Some("a")).unwrap();
        let b = shared_prefix_addresses(&tokens, 4, 3, Some("b")).unwrap();
        assert!(a.iter().zip(&b).all(|(a, b)| a != b) && a != plain);
        assert_eq!(
            shared_prefix_addresses(&tokens[..8], 4, 2, Some("a")).unwrap(),
            a[..2]
        );
        assert_eq!(shared_prefix_addresses(&tokens, 4, 4, Some("a")), None);
    }

    /// A huge declared length with a valid checksum is refused without allocating it.
    #[test]
    fn lying_lengths_are_refused() {
        let mut body = blob().encode();
        body.truncate(body.len() - 8);
        let at = 8 + 4 + 2 + 4 + 2 + 6 + 8 + 8;
        body[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            BlockBlob::decode(bd3lm_bytes::seal(body))
                .unwrap_err()
                .to_string()
                .contains("payload")
        );
    }
}
