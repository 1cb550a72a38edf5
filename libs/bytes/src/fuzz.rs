//! A mutation fuzzer for the decoders of untrusted bytes, on stable Rust and without
//! dependencies: valid seeds are mutated (bit flips, boundary integers written over
//! lengths, truncations, insertions, deletions, duplicated ranges, splices of two seeds),
//! one to four mutations per case, for a time budget. A decoder passes when no case
//! panics; the case that panicked is printed in hex with the run's seed, so it can be
//! kept as a regression test.
//!
//! The budget is `BD3LM_FUZZ_SECS` seconds per target (the tests' default is a short CI
//! run); `BD3LM_FUZZ_SEED` replays a run.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, Instant};

/// A small xorshift generator: reproducible from its seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Integers that sit on the edges decoders get wrong.
const BOUNDARIES: [u64; 10] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    i64::MAX as u64,
    u64::MAX,
];

/// One mutation of `data` (seeds: the other inputs to splice from).
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(8) {
        0 if len > 0 => {
            let at = rng.below(len);
            data[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let width = [1, 2, 4, 8][rng.below(4)].min(len);
            let at = rng.below(len - width + 1);
            let value = BOUNDARIES[rng.below(BOUNDARIES.len())].to_le_bytes();
            data[at..at + width].copy_from_slice(&value[..width]);
        }
        2 => data.truncate(rng.below(len + 1)),
        3 => {
            let at = rng.below(len + 1);
            let extra: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.next() as u8).collect();
            data.splice(at..at, extra);
        }
        4 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(32)).min(len);
            data.drain(at..end);
        }
        5 if len > 0 => {
            let at = rng.below(len);
            let end = (at + 1 + rng.below(64)).min(len);
            let copy = data[at..end].to_vec();
            let to = rng.below(len + 1);
            data.splice(to..to, copy);
        }
        6 => {
            let other = &seeds[rng.below(seeds.len())];
            let keep = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            data.truncate(keep);
            data.extend_from_slice(&other[from..]);
        }
        _ if len > 0 => {
            // ASCII digits and JSON punctuation: text formats' boundaries.
            let at = rng.below(len);
            let text = b"0123456789-.e\"{}[],:";
            data[at] = text[rng.below(text.len())];
        }
        _ => data.push(rng.next() as u8),
    }
}

/// The run's seed: `BD3LM_FUZZ_SEED`, else the clock.
fn seed() -> u64 {
    std::env::var("BD3LM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            now.map_or(1, |d| d.as_nanos() as u64) | 1
        })
}

/// The budget: `BD3LM_FUZZ_SECS`, else `default`.
fn budget(default: Duration) -> Duration {
    std::env::var("BD3LM_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(default, Duration::from_secs_f64)
}

/// Runs `check` on each seed, then on mutations of them until the budget (see the module)
/// is spent; returns the number of cases. A panic in `check` is reported with the input
/// and the seed, then passed on.
pub fn fuzz(name: &str, seeds: &[Vec<u8>], default: Duration, mut check: impl FnMut(&[u8])) -> u64 {
    assert!(!seeds.is_empty(), "fuzz target {name} needs a seed");
    let seed = seed();
    let mut rng = Rng(seed);
    let deadline = Instant::now() + budget(default);
    let mut cases = 0u64;
    let mut input = Vec::new();
    loop {
        input.clone_from(&seeds[cases as usize % seeds.len()]);
        if cases >= seeds.len() as u64 {
            for _ in 0..1 + rng.below(4) {
                mutate(&mut rng, &mut input, seeds);
            }
        }
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&input))) {
            let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("fuzz target {name}: case {cases} of seed {seed} panicked on input {hex}");
            resume_unwind(panic);
        }
        cases += 1;
        if cases.is_multiple_of(64) && Instant::now() >= deadline {
            break;
        }
    }
    eprintln!("fuzz target {name}: {cases} cases, seed {seed}, no panic");
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzzer finds a planted bug: a decoder that trusts a length byte.
    #[test]
    fn finds_a_decoder_that_trusts_its_length() {
        let trusting = |bytes: &[u8]| {
            if let Some((&len, rest)) = bytes.split_first() {
                assert!(len as usize <= rest.len(), "planted");
            }
        };
        let seeds = [vec![3, 1, 2, 3]];
        let found = catch_unwind(|| fuzz("planted", &seeds, Duration::from_secs(5), trusting));
        let payload = found.expect_err("a 4-byte decoder with a length bug survived");
        let message = (payload.downcast_ref::<&str>().copied())
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str));
        assert_eq!(message, Some("planted"), "the fuzzer itself panicked");
    }

    /// Mutations stay reproducible from the seed.
    #[test]
    fn mutations_replay_from_their_seed() {
        let run = |seed| {
            let mut rng = Rng(seed);
            let mut data = b"{\"a\": 12345678}".to_vec();
            for _ in 0..50 {
                mutate(&mut rng, &mut data, &[b"xyz".to_vec()]);
            }
            data
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(9));
    }
}
