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

/// Denoises `block` (prompt tokens in place, `[MASK]` elsewhere) to completion.
///
/// All randomness comes from `rng`; `cancel` is checked between steps.
pub fn denoise_block(
    net: &mut impl Denoiser,
    block: &[u32],
    params: &SamplingParams,
    rng: &mut impl Rng,
    cancel: Option<&AtomicBool>,
) -> Result<BlockOutcome> {
    params.validate()?;
    let mask = net.mask_id();
    if block.len() != net.block_size() {
        return Err(Error::Param {
            name: "block",
            reason: format!(
                "expected {} tokens, found {}",
                net.block_size(),
                block.len()
            ),
        });
    }
    let mut state = State {
        tokens: block.to_vec(),
        dists: BTreeMap::new(),
        passes: 0,
    };
    let mut steps = 0;
    let mut t = 1.0f64;
    while state.tokens.contains(&mask) {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Cancelled);
        }
        let masked: Vec<u32> = (0..state.tokens.len() as u32)
            .filter(|&i| state.tokens[i as usize] == mask)
            .collect();
        let unmask: Vec<u32> = match params.sampler {
            Sampler::Ddpm => {
                let s = (1.0 - (steps + 1) as f64 / params.steps as f64).max(0.0);
                t = (1.0 - steps as f64 / params.steps as f64).max(s);
                let (pt, ps) = (SCHEDULE.move_chance(t), SCHEDULE.move_chance(s));
                let chance = if steps + 1 >= params.steps || pt <= 0.0 {
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
                t *= rng.random::<f64>().powf(1.0 / masked.len() as f64);
                vec![masked[rng.random_range(0..masked.len())]]
            }
            Sampler::Confidence { threshold } => {
                state.ensure(net, &masked, t, &params.filter)?;
                let left = params.steps.saturating_sub(steps).max(1);
                let at_least = masked.len().div_ceil(left);
                let mut ranked: Vec<(f32, u32)> = masked
                    .iter()
                    .map(|&i| (state.dists[&i].top().1, i))
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
                t = (t - 1.0 / params.steps as f64).max(0.0);
                chosen
            }
        };
        steps += 1;
        if unmask.is_empty() {
            continue;
        }
        state.ensure(net, &unmask, t, &params.filter)?;
        let drawn: Vec<(u32, u32)> = unmask
            .iter()
            .map(|&i| (i, state.dists[&i].draw(rng, params.greedy)))
            .collect();
        for (i, token) in drawn {
            state.tokens[i as usize] = token;
        }
        state.dists.clear();
    }
    Ok(BlockOutcome {
        tokens: state.tokens,
        forward_passes: state.passes,
        steps,
    })
}

/// The block being denoised and the distributions computed for its current content.
struct State {
    tokens: Vec<u32>,
    /// Distributions by position, valid while `tokens` is unchanged.
    dists: BTreeMap<u32, TokenDist>,
    passes: usize,
}

impl State {
    /// Makes sure distributions of `rows` exist for the current tokens, running one pass
    /// for the missing rows (all of them again when the network is time conditioned, as
    /// its output changes with `t`).
    fn ensure(
        &mut self,
        net: &mut impl Denoiser,
        rows: &[u32],
        t: f64,
        filter: &Filter,
    ) -> Result<()> {
        if net.time_conditioned() {
            self.dists.clear();
        }
        let missing: Vec<u32> = rows
            .iter()
            .copied()
            .filter(|r| !self.dists.contains_key(r))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let logits = net.logits(&self.tokens, t, &missing)?;
        self.passes += 1;
        let mask = net.mask_id();
        for (row, l) in missing.into_iter().zip(logits) {
            self.dists.insert(row, TokenDist::new(&l, mask, filter));
        }
        Ok(())
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
}
