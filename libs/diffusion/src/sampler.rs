//! Denoising one block: the reverse process of a masked diffusion model, inside a block
//! (docs/model.md, "Sampling").
//!
//! A block starts with its prompt tokens in place and `[MASK]` elsewhere; each step
//! unmasks some positions with tokens drawn from the model's SUBS distribution. Logits are
//! computed only for positions about to be unmasked (or ranked, in confidence mode), and a
//! forward pass is skipped when the block has not changed since the last one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use rand::Rng;

pub use bd3lm_sampling::{Filter, Sampler, SamplingParams};

use crate::dist::TokenDist;
use crate::{Error, NoiseSchedule, Result};

/// The masking schedule of the DDPM update: the log-linear one, whose noise level the
/// networks are conditioned on (`sigma = -ln(1 - t)`, see `generate::Net`).
const SCHEDULE: NoiseSchedule = NoiseSchedule::LogLinear;

/// What the sampler needs from a network: logits for some positions of the current block.
pub trait Denoiser {
    /// Number of tokens in a block.
    fn block_size(&self) -> usize;
    /// The `[MASK]` id.
    fn mask_id(&self) -> u32;
    /// Whether the logits depend on the noise level `t` (time conditioning).
    fn time_conditioned(&self) -> bool;
    /// Logits over the vocabulary for each of `rows` of `block` at noise level `t`.
    fn logits(&mut self, block: &[u32], t: f64, rows: &[u32]) -> Result<Vec<Vec<f32>>>;
}

/// The result of denoising one block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockOutcome {
    /// The finished block, no `[MASK]` left.
    pub tokens: Vec<u32>,
    /// Forward passes run (commit excluded).
    pub forward_passes: usize,
    /// Denoising steps taken.
    pub steps: usize,
}

/// Denoises `block` (prompt tokens in place, `[MASK]` elsewhere) to completion with `net`.
///
/// All randomness comes from `rng`; `cancel` is checked between steps.
pub fn denoise_block(
    net: &mut impl Denoiser,
    block: &[u32],
    params: &SamplingParams,
    rng: &mut impl Rng,
    cancel: Option<&AtomicBool>,
) -> Result<BlockOutcome> {
    let denoiser = BlockDenoiser::new(
        block,
        params,
        net.block_size(),
        net.mask_id(),
        net.time_conditioned(),
    )?;
    drive(net, denoiser, rng, cancel)
}

/// Runs `denoiser` to completion with `net`, one forward pass per [`Step::Logits`].
pub fn drive(
    net: &mut impl Denoiser,
    mut denoiser: BlockDenoiser,
    rng: &mut impl Rng,
    cancel: Option<&AtomicBool>,
) -> Result<BlockOutcome> {
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Cancelled);
        }
        match denoiser.advance(rng) {
            Step::Done => return Ok(denoiser.outcome()),
            Step::Logits { rows, t } => {
                let logits = net.logits(denoiser.tokens(), t, &rows)?;
                denoiser.supply(&rows, &logits);
            }
        }
    }
}

/// What a block being denoised needs next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// The logits of `rows` of the block's current tokens at noise level `t`.
    Logits {
        /// Block positions, ascending.
        rows: Vec<u32>,
        /// The noise level.
        t: f64,
    },
    /// The block is finished.
    Done,
}

/// One block being denoised, as a machine that stops wherever it needs a forward pass:
/// [`BlockDenoiser::advance`] runs the sampler until it needs logits or is done, and
/// [`BlockDenoiser::supply`] gives it the logits. A scheduler can so advance many
/// sessions' blocks and compute their passes together; the random draws and their order
/// are those of [`denoise_block`], whatever the interleaving.
pub struct BlockDenoiser {
    params: SamplingParams,
    mask: u32,
    time_conditioned: bool,
    tokens: Vec<u32>,
    /// Distributions by position, valid while `tokens` is unchanged.
    dists: BTreeMap<u32, TokenDist>,
    passes: usize,
    steps: usize,
    t: f64,
    phase: Phase,
}

/// Where a step stands. `asked` is set once the step's distributions were asked for, so
/// that supplying them resumes the step instead of asking again.
enum Phase {
    /// Choosing the positions to unmask (the confidence sampler first needs the
    /// distributions of every masked position).
    Choose { asked: bool },
    /// Drawing tokens at `unmask`.
    Draw { unmask: Vec<u32>, asked: bool },
}

impl BlockDenoiser {
    /// A block of `block_size` tokens (prompt tokens in place, `mask` elsewhere) for a
    /// network whose logits depend on `t` when `time_conditioned`.
    pub fn new(
        block: &[u32],
        params: &SamplingParams,
        block_size: usize,
        mask: u32,
        time_conditioned: bool,
    ) -> Result<Self> {
        params.validate()?;
        if block.len() != block_size {
            return Err(Error::Param {
                name: "block",
                reason: format!("expected {block_size} tokens, found {}", block.len()),
            });
        }
        Ok(Self {
            params: *params,
            mask,
            time_conditioned,
            tokens: block.to_vec(),
            dists: BTreeMap::new(),
            passes: 0,
            steps: 0,
            t: 1.0,
            phase: Phase::Choose { asked: false },
        })
    }

    /// The block's current tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Runs the sampler until it needs logits or the block is finished.
    pub fn advance(&mut self, rng: &mut impl Rng) -> Step {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Choose { asked: false }) {
                Phase::Choose { asked } => {
                    let masked: Vec<u32> = (0..self.tokens.len() as u32)
                        .filter(|&i| self.tokens[i as usize] == self.mask)
                        .collect();
                    if masked.is_empty() {
                        return Step::Done;
                    }
                    let ranks = matches!(self.params.sampler, Sampler::Confidence { .. });
                    if ranks
                        && !asked
                        && let Some(rows) = self.missing(&masked)
                    {
                        self.phase = Phase::Choose { asked: true };
                        return Step::Logits { rows, t: self.t };
                    }
                    let unmask = self.choose(&masked, rng);
                    self.steps += 1;
                    if !unmask.is_empty() {
                        self.phase = Phase::Draw {
                            unmask,
                            asked: false,
                        };
                    }
                }
                Phase::Draw { unmask, asked } => {
                    if !asked && let Some(rows) = self.missing(&unmask) {
                        self.phase = Phase::Draw {
                            unmask,
                            asked: true,
                        };
                        return Step::Logits { rows, t: self.t };
                    }
                    for &i in &unmask {
                        self.tokens[i as usize] = self.dists[&i].draw(rng, self.params.greedy);
                    }
                    self.dists.clear();
                }
            }
        }
    }

    /// The logits asked for by the last [`Step::Logits`], one row each: one forward pass.
    pub fn supply(&mut self, rows: &[u32], logits: &[Vec<f32>]) {
        self.passes += 1;
        for (&row, l) in rows.iter().zip(logits) {
            let dist = TokenDist::new(l, self.mask, &self.params.filter);
            self.dists.insert(row, dist);
        }
    }

    /// The finished block and what it took.
    pub fn outcome(&self) -> BlockOutcome {
        BlockOutcome {
            tokens: self.tokens.clone(),
            forward_passes: self.passes,
            steps: self.steps,
        }
    }

    /// The rows of `rows` without a distribution for the current tokens (all of them
    /// when the network is time conditioned: its output changes with `t`); `None` when
    /// every one has one.
    fn missing(&mut self, rows: &[u32]) -> Option<Vec<u32>> {
        if self.time_conditioned {
            self.dists.clear();
        }
        let missing: Vec<u32> = rows
            .iter()
            .copied()
            .filter(|r| !self.dists.contains_key(r))
            .collect();
        (!missing.is_empty()).then_some(missing)
    }

    /// The positions the next step unmasks, among `masked`, and the step's noise level.
    fn choose(&mut self, masked: &[u32], rng: &mut impl Rng) -> Vec<u32> {
        let (steps, total) = (self.steps, self.params.steps);
        match self.params.sampler {
            Sampler::Ddpm => {
                let s = (1.0 - (steps + 1) as f64 / total as f64).max(0.0);
                self.t = (1.0 - steps as f64 / total as f64).max(s);
                let (pt, ps) = (SCHEDULE.move_chance(self.t), SCHEDULE.move_chance(s));
                let chance = if steps + 1 >= total || pt <= 0.0 {
                    1.0
                } else {
                    (pt - ps) / pt
                };
                masked
                    .iter()
                    .copied()
                    .filter(|_| rng.random::<f64>() < chance)
                    .collect()
            }
            Sampler::FirstHitting => {
                self.t *= rng.random::<f64>().powf(1.0 / masked.len() as f64);
                vec![masked[rng.random_range(0..masked.len())]]
            }
            Sampler::Confidence { threshold } => {
                let left = total.saturating_sub(steps).max(1);
                let at_least = masked.len().div_ceil(left);
                let mut ranked: Vec<(f32, u32)> = masked
                    .iter()
                    .map(|&i| (self.dists[&i].top().1, i))
                    .collect();
                ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                let sure = ranked
                    .iter()
                    .take_while(|(p, _)| *p as f64 > threshold)
                    .count();
                let mut chosen: Vec<u32> = ranked
                    .iter()
                    .take(sure.max(at_least))
                    .map(|&(_, i)| i)
                    .collect();
                chosen.sort_unstable();
                self.t = (self.t - 1.0 / total as f64).max(0.0);
                chosen
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A network whose distribution at every position is fixed: `probs[i]` for token i.
    struct Stub {
        probs: Vec<f64>,
        block_size: usize,
        calls: Vec<usize>,
    }

    impl Denoiser for Stub {
        fn block_size(&self) -> usize {
            self.block_size
        }
        fn mask_id(&self) -> u32 {
            self.probs.len() as u32 - 1
        }
        fn time_conditioned(&self) -> bool {
            false
        }
        fn logits(&mut self, block: &[u32], _t: f64, rows: &[u32]) -> Result<Vec<Vec<f32>>> {
            assert!(
                rows.iter().all(|&r| block[r as usize] == self.mask_id()),
                "logits asked for an unmasked row"
            );
            self.calls.push(rows.len());
            Ok(rows
                .iter()
                .map(|_| self.probs.iter().map(|p| p.ln() as f32).collect())
                .collect())
        }
    }

    fn stub(block_size: usize) -> Stub {
        Stub {
            probs: vec![0.5, 0.3, 0.15, 0.05, 0.0],
            block_size,
            calls: Vec::new(),
        }
    }

    fn params(sampler: Sampler, steps: usize) -> SamplingParams {
        SamplingParams {
            sampler,
            steps,
            filter: Filter::default(),
            greedy: false,
        }
    }

    #[test]
    fn first_hitting_unmasks_exactly_one_token_per_step() {
        let mut net = stub(8);
        let block = [0, 4, 4, 4, 1, 4, 4, 4];
        let out = denoise_block(
            &mut net,
            &block,
            &params(Sampler::FirstHitting, 8),
            &mut ChaCha8Rng::seed_from_u64(1),
            None,
        )
        .unwrap();
        assert_eq!(out.steps, 6);
        assert_eq!(out.forward_passes, 6);
        assert!(net.calls.iter().all(|&rows| rows == 1));
        assert_eq!(
            (out.tokens[0], out.tokens[4]),
            (0, 1),
            "prompt tokens are kept"
        );
        assert!(!out.tokens.contains(&4));
    }

    #[test]
    fn ddpm_finishes_in_t_steps_and_skips_passes_when_nothing_changes() {
        for steps in [1, 2, 4, 16] {
            let mut net = stub(4);
            let out = denoise_block(
                &mut net,
                &[4; 4],
                &params(Sampler::Ddpm, steps),
                &mut ChaCha8Rng::seed_from_u64(2),
                None,
            )
            .unwrap();
            assert!(out.steps <= steps, "{steps}: {}", out.steps);
            assert!(out.forward_passes <= out.steps.min(4));
            assert!(!out.tokens.contains(&4));
        }
    }

    /// With a threshold no position reaches, confidence mode still unmasks enough per step
    /// to finish within T steps; with a threshold every position passes, one step suffices.
    #[test]
    fn confidence_mode_never_stalls() {
        let mut net = stub(16);
        let out = denoise_block(
            &mut net,
            &[4; 16],
            &params(Sampler::Confidence { threshold: 1.0 }, 4),
            &mut ChaCha8Rng::seed_from_u64(3),
            None,
        )
        .unwrap();
        assert_eq!((out.steps, out.forward_passes), (4, 4));
        let out = denoise_block(
            &mut net,
            &[4; 16],
            &params(Sampler::Confidence { threshold: 0.4 }, 16),
            &mut ChaCha8Rng::seed_from_u64(3),
            None,
        )
        .unwrap();
        assert_eq!((out.steps, out.forward_passes), (1, 1));
        assert!(!out.tokens.contains(&4));
    }

    /// Over many blocks, each unmasked token follows the model's distribution.
    #[test]
    fn sampled_tokens_follow_the_model_distribution() {
        let mut net = stub(4);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut counts = [0usize; 5];
        let blocks = 20_000;
        for _ in 0..blocks {
            let out = denoise_block(
                &mut net,
                &[4; 4],
                &params(Sampler::FirstHitting, 4),
                &mut rng,
                None,
            )
            .unwrap();
            out.tokens.iter().for_each(|&t| counts[t as usize] += 1);
        }
        let n = (blocks * 4) as f64;
        for (i, &c) in counts.iter().enumerate() {
            let p = net.probs[i];
            let se = (p * (1.0 - p) / n).sqrt().max(1e-9);
            assert!(
                (c as f64 / n - p).abs() <= 5.0 * se,
                "token {i}: {} vs {p}",
                c as f64 / n
            );
        }
    }

    #[test]
    fn same_rng_same_tokens_and_cancellation_stops() {
        let run = |seed| {
            denoise_block(
                &mut stub(16),
                &[4; 16],
                &params(Sampler::Ddpm, 8),
                &mut ChaCha8Rng::seed_from_u64(seed),
                None,
            )
            .unwrap()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5).tokens, run(6).tokens);
        let cancel = AtomicBool::new(true);
        let err = denoise_block(
            &mut stub(4),
            &[4; 4],
            &params(Sampler::Ddpm, 4),
            &mut ChaCha8Rng::seed_from_u64(1),
            Some(&cancel),
        );
        assert!(matches!(err, Err(Error::Cancelled)));
    }

    /// Parameters are checked before any pass: the error names the field.
    #[test]
    fn invalid_parameters_are_refused_before_any_pass() {
        let mut net = stub(4);
        let err = denoise_block(
            &mut net,
            &[4; 4],
            &SamplingParams {
                steps: 0,
                ..params(Sampler::Ddpm, 1)
            },
            &mut ChaCha8Rng::seed_from_u64(1),
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("steps"), "{err}");
        assert!(err.is_request_fault());
        assert!(net.calls.is_empty());
    }

    /// Blocks advanced together, their passes computed round by round, get exactly the
    /// tokens, passes and steps each gets alone: what a batching scheduler relies on.
    #[test]
    fn interleaved_blocks_get_what_they_get_alone() {
        let samplers = [
            Sampler::Ddpm,
            Sampler::FirstHitting,
            Sampler::Confidence { threshold: 0.3 },
            Sampler::Confidence { threshold: 0.9 },
        ];
        let rng = |i: usize| ChaCha8Rng::seed_from_u64(i as u64);
        let alone: Vec<BlockOutcome> = samplers
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let p = params(s, 8);
                denoise_block(&mut stub(8), &[4; 8], &p, &mut rng(i), None).unwrap()
            })
            .collect();
        let mut net = stub(8);
        let mut blocks: Vec<BlockDenoiser> = samplers
            .iter()
            .map(|&s| BlockDenoiser::new(&[4; 8], &params(s, 8), 8, 4, false).unwrap())
            .collect();
        let mut rngs: Vec<ChaCha8Rng> = (0..samplers.len()).map(rng).collect();
        let mut done = vec![false; samplers.len()];
        while done.contains(&false) {
            let mut wanted = Vec::new();
            for (i, block) in blocks.iter_mut().enumerate() {
                if done[i] {
                    continue;
                }
                match block.advance(&mut rngs[i]) {
                    Step::Done => done[i] = true,
                    Step::Logits { rows, t } => wanted.push((i, rows, t)),
                }
            }
            for (i, rows, t) in wanted {
                let logits = net.logits(blocks[i].tokens(), t, &rows).unwrap();
                blocks[i].supply(&rows, &logits);
            }
        }
        for (block, expected) in blocks.into_iter().zip(alone) {
            assert_eq!(block.outcome(), expected);
        }
    }
}
