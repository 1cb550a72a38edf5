//! Byte utilities shared by every binary format of the system: one checksum and one
//! bounds-checked reader. No dependencies, so the model, the store and the training data
//! formats can all use it. With the `fuzz` feature, [`fuzz`]: the mutation fuzzer their
//! decoders' tests run.
#![warn(missing_docs)]

#[cfg(any(test, feature = "fuzz"))]
pub mod fuzz;

/// A 64-bit FNV-1a-style checksum over 8-byte little-endian words, against corruption in
/// transit and at rest (not an authenticator).
///
/// Eight bytes per step keeps it fast enough that it never bounds blob or checkpoint
/// throughput; the zero-padded tail and then the total length are mixed in last, so any
/// change of one word or of the length changes it. Feeding the bytes in pieces gives the
/// same value as feeding them at once.
#[derive(Debug, Clone)]
pub struct Checksum {
    hash: u64,
    /// Bytes of a word not yet complete.
    pending: [u8; 8],
    pending_len: usize,
    total: u64,
}

const PRIME: u64 = 0x0000_0100_0000_01b3;
const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// A checksum of no bytes yet.
    pub fn new() -> Self {
        Self {
            hash: OFFSET,
            pending: [0; 8],
            pending_len: 0,
            total: 0,
        }
    }

    fn word(&mut self, word: [u8; 8]) {
        self.hash = (self.hash ^ u64::from_le_bytes(word)).wrapping_mul(PRIME);
    }

    /// Feeds `bytes`.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.total += bytes.len() as u64;
        if self.pending_len > 0 {
            let n = (8 - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + n].copy_from_slice(&bytes[..n]);
            self.pending_len += n;
            bytes = &bytes[n..];
            if self.pending_len < 8 {
                return;
            }
            self.word(self.pending);
            self.pending_len = 0;
        }
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            self.word(w.try_into().expect("8 bytes"));
        }
        let rest = words.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The checksum of everything fed.
    pub fn finish(&self) -> u64 {
        let mut tail = [0u8; 8];
        tail[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
        let hash = (self.hash ^ u64::from_le_bytes(tail)).wrapping_mul(PRIME);
        (hash ^ self.total).wrapping_mul(PRIME)
    }
}

/// The [`Checksum`] of `bytes`.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut sum = Checksum::new();
    sum.update(bytes);
    sum.finish()
}

/// Appends `body`'s checksum to it (the trailer every format of the system ends with).
pub fn seal(mut body: Vec<u8>) -> Vec<u8> {
    let sum = checksum(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    body
}

/// Splits off and verifies the trailing checksum that [`seal`] appended; `None` when the
/// bytes are too short or do not match.
pub fn unseal(bytes: &[u8]) -> Option<&[u8]> {
    let split = bytes.len().checked_sub(8)?;
    let (body, sum) = bytes.split_at(split);
    (checksum(body).to_le_bytes() == sum).then_some(body)
}

/// Fewer bytes were left than a read needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    /// Bytes the read needed.
    pub needed: usize,
    /// Bytes that were left.
    pub left: usize,
}

impl std::fmt::Display for Truncated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "truncated: {} bytes needed, {} left",
            self.needed, self.left
        )
    }
}

impl std::error::Error for Truncated {}

/// A bounds-checked little-endian reader: every read checks the bytes left first, so a
/// hostile length is an error before anything is allocated.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        let left = self.remaining();
        if n > left {
            return Err(Truncated { needed: n, left });
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, Truncated> {
        self.array().map(u16::from_le_bytes)
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        self.array().map(u32::from_le_bytes)
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        self.array().map(u64::from_le_bytes)
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// Everything not read yet (the reader is left at the end).
    pub fn rest(&mut self) -> &'a [u8] {
        let out = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-wise definition, written out once, as the reference.
    fn reference(bytes: &[u8]) -> u64 {
        let mut words = bytes.chunks_exact(8);
        let mut hash = OFFSET;
        for w in &mut words {
            hash = (hash ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(PRIME);
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        hash = (hash ^ u64::from_le_bytes(tail)).wrapping_mul(PRIME);
        (hash ^ bytes.len() as u64).wrapping_mul(PRIME)
    }

    #[test]
    fn pieces_give_the_same_checksum_as_the_whole() {
        let bytes: Vec<u8> = (0..100u32).map(|i| (i * 37 % 251) as u8).collect();
        for len in [0, 1, 7, 8, 9, 63, 100] {
            let whole = &bytes[..len];
            assert_eq!(checksum(whole), reference(whole), "len {len}");
            for cut in [1, 3, 8, 13] {
                let mut sum = Checksum::new();
                whole.chunks(cut).for_each(|c| sum.update(c));
                assert_eq!(sum.finish(), checksum(whole), "len {len} cut {cut}");
            }
        }
    }

    #[test]
    fn any_flip_or_zero_padding_changes_it() {
        let bytes = vec![5u8; 24];
        let base = checksum(&bytes);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert_ne!(checksum(&b), base, "flip {i}");
        }
        assert_ne!(checksum(&[1, 0]), checksum(&[1]), "the length counts");
    }

    #[test]
    fn sealed_bytes_verify_and_damaged_ones_do_not() {
        let sealed = seal(b"payload".to_vec());
        assert_eq!(unseal(&sealed), Some(&b"payload"[..]));
        let mut damaged = sealed.clone();
        damaged[2] ^= 4;
        assert_eq!(unseal(&damaged), None);
        assert_eq!(unseal(&sealed[..5]), None);
    }

    #[test]
    fn reads_are_bounds_checked() {
        let mut r = Reader::new(&[1, 0, 2, 0, 0, 0, 9]);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.u32(), Ok(2));
        assert_eq!(r.u64(), Err(Truncated { needed: 8, left: 1 }));
        assert_eq!(
            r.take(usize::MAX),
            Err(Truncated {
                needed: usize::MAX,
                left: 1
            })
        );
        assert_eq!(r.rest(), &[9]);
        assert_eq!(r.remaining(), 0);
    }
}
