//! The stop rules of a generation: max tokens, end of sequence, low entropy (variable
//! length), token and text stop sequences.

/// Tokens over which the low-entropy stop rule measures unigram entropy.
pub const ENTROPY_WINDOW: usize = 256;
/// Entropy (nats) under which the low-entropy rule stops a generation.
pub const ENTROPY_FLOOR: f64 = 4.0;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The requested number of new tokens was reached.
    MaxTokens,
    /// An end-of-sequence token was generated (variable-length mode).
    Eos,
    /// The last 256 tokens had unigram entropy below 4 nats (variable-length mode).
    LowEntropy,
    /// A stop sequence appeared.
    StopSequence,
    /// The caller cancelled.
    Cancelled,
}

impl StopReason {
    /// Lower-case name for output and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::MaxTokens => "max_tokens",
            Self::Eos => "eos",
            Self::LowEntropy => "low_entropy",
            Self::StopSequence => "stop_sequence",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A caller-supplied stop rule (text-level stop sequences): given the generated tokens
/// (each call sees those of the last one and more), the number of them to keep when
/// generation must stop. It should look at the new tokens only (and a bounded lookback),
/// so that its cost per block does not grow with the generation.
pub type StopHook = Box<dyn FnMut(&[u32]) -> Option<usize> + Send>;

/// When a generation stops.
pub struct StopRules {
    /// Most new tokens to return (at least 1).
    pub max_new_tokens: usize,
    /// Variable-length mode: stop after this end-of-sequence id, and on low entropy.
    pub eos: Option<u32>,
    /// Token sequences that end the generation; they are not returned.
    pub stop_sequences: Vec<Vec<u32>>,
    /// Further stop rule, e.g. text stop sequences.
    pub hook: Option<StopHook>,
    /// Generated tokens already searched: each check looks at the new ones only (and
    /// the last stop sequence's length before them).
    scanned: usize,
}

impl StopRules {
    /// The rules of a generation.
    pub fn new(
        max_new_tokens: usize,
        eos: Option<u32>,
        stop_sequences: Vec<Vec<u32>>,
        hook: Option<StopHook>,
    ) -> Self {
        Self {
            max_new_tokens,
            eos,
            stop_sequences,
            hook,
            scanned: 0,
        }
    }

    /// Stop after `max_new_tokens` only.
    pub fn max_tokens(max_new_tokens: usize) -> Self {
        Self::new(max_new_tokens, None, Vec::new(), None)
    }

    /// How many of `generated` to return, and whether to stop, given the whole sequence
    /// `all` (prompt included). Each call is given the tokens of the last one and more;
    /// its cost grows with the new tokens, not with all of them.
    pub fn check(&mut self, generated: &[u32], all: &[u32]) -> (usize, Option<StopReason>) {
        if generated.len() < self.scanned {
            self.scanned = 0;
        }
        let scanned = self.scanned;
        self.scanned = generated.len();
        let mut stop = (generated.len().min(self.max_new_tokens), None);
        let mut earlier = |keep: usize, reason: StopReason| {
            if stop.1.is_none() || keep < stop.0 {
                stop = (keep.min(stop.0), Some(reason));
            }
        };
        if let Some(eos) = self.eos
            && let Some(pos) = generated[scanned..].iter().position(|&t| t == eos)
        {
            earlier(scanned + pos + 1, StopReason::Eos);
        }
        for seq in self.stop_sequences.iter().filter(|s| !s.is_empty()) {
            // A sequence may end in the new tokens and begin before them.
            let from = scanned.saturating_sub(seq.len() - 1);
            if let Some(pos) = generated[from..]
                .windows(seq.len())
                .position(|w| w == seq.as_slice())
            {
                earlier(from + pos, StopReason::StopSequence);
            }
        }
        if let Some(keep) = self.hook.as_mut().and_then(|h| h(generated)) {
            earlier(keep, StopReason::StopSequence);
        }
        if stop.1.is_none() && self.eos.is_some() && low_entropy(all) {
            stop.1 = Some(StopReason::LowEntropy);
        }
        if stop.1.is_none() && generated.len() >= self.max_new_tokens {
            stop.1 = Some(StopReason::MaxTokens);
        }
        stop
    }
}

/// Whether the last [`ENTROPY_WINDOW`] tokens have unigram entropy below [`ENTROPY_FLOOR`].
pub fn low_entropy(tokens: &[u32]) -> bool {
    if tokens.len() < ENTROPY_WINDOW {
        return false;
    }
    let mut window = tokens[tokens.len() - ENTROPY_WINDOW..].to_vec();
    window.sort_unstable();
    let n = ENTROPY_WINDOW as f64;
    let entropy: f64 = window
        .chunk_by(|a, b| a == b)
        .map(|run| {
            let p = run.len() as f64 / n;
            -p * p.ln()
        })
        .sum();
    entropy < ENTROPY_FLOOR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_rules_truncate_and_report() {
        let all: Vec<u32> = (0..20).collect();
        let mut rules = StopRules {
            eos: Some(7),
            ..StopRules::max_tokens(100)
        };
        assert_eq!(rules.check(&all[2..], &all), (6, Some(StopReason::Eos)));
        let mut rules = StopRules {
            stop_sequences: vec![vec![5, 6]],
            ..StopRules::max_tokens(100)
        };
        assert_eq!(
            rules.check(&all[2..], &all),
            (3, Some(StopReason::StopSequence))
        );
        let mut rules = StopRules::max_tokens(4);
        assert_eq!(
            rules.check(&all[2..], &all),
            (4, Some(StopReason::MaxTokens))
        );
        let mut rules = StopRules {
            hook: Some(Box::new(|g: &[u32]| g.contains(&9).then_some(1))),
            ..StopRules::max_tokens(100)
        };
        assert_eq!(
            rules.check(&all[2..], &all),
            (1, Some(StopReason::StopSequence))
        );
        assert_eq!(
            StopRules::max_tokens(100).check(&all[2..], &all),
            (18, None)
        );
    }

    /// Checked block by block (each check seeing only the new tokens and a lookback), the
    /// rules stop where one check of the whole output stops: sequences that straddle two
    /// blocks included.
    #[test]
    fn block_by_block_checks_find_what_a_full_scan_finds() {
        let rules = || StopRules::new(10_000, Some(61), vec![vec![13, 14, 15], vec![40]], None);
        for seed in 0..200u32 {
            let all: Vec<u32> = (0..400u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(97)) % 64)
                .collect();
            let full = rules().check(&all, &all);
            let mut incremental = rules();
            let mut found = (all.len(), None);
            for end in (4..=all.len()).step_by(4) {
                found = incremental.check(&all[..end], &all[..end]);
                if found.1.is_some() {
                    break;
                }
            }
            assert_eq!(found.1, full.1, "seed {seed}");
            if found.1.is_some() {
                assert_eq!(found.0, full.0, "seed {seed}");
            }
        }
    }

    #[test]
    fn low_entropy_rule() {
        let repetitive: Vec<u32> = (0..300).map(|i| i % 20).collect();
        let varied: Vec<u32> = (0..300).map(|i| i * 7 % 257).collect();
        assert!(low_entropy(&repetitive), "ln 20 < 4");
        assert!(!low_entropy(&varied));
        assert!(!low_entropy(&repetitive[..100]));
    }
}
