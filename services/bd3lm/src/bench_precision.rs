//! `bd3lm bench kv-precision`: how often a KV cache held in bf16 or f16 gives the tokens
//! an f32 one gives, on the bundled demo model and the random-weight tiny shape.
//!
//! Each seed generates from BOS with the default sampling (first-hitting, nucleus 0.9),
//! and again greedily (the most likely token at each position the sampler picks), once per
//! precision; the narrower caches' tokens are compared position by position with f32's.
//! Sampling is discrete, so a rounding that moves one draw across a boundary changes that
//! token and, through the context, most of what follows: the first divergence says more
//! than the share of equal positions.

use bd3lm_diffusion::{SamplingParams, Session, StopRules, generate};
use bd3lm_model::{Bd3lm, Config, checkpoint};
use bd3lm_text::Text;
use candle_core::{DType, Device};
use serde::Serialize;

/// One model, precision and decoding against f32.
#[derive(Debug, Serialize)]
struct Agreement {
    model: &'static str,
    kv_dtype: &'static str,
    /// Greedy decoding, else sampled.
    greedy: bool,
    seeds: usize,
    tokens: usize,
    /// Seeds whose every token equals f32's.
    identical: usize,
    /// Share of positions, over all seeds, holding f32's token.
    agreement: f64,
    /// Mean position of the first token that differs (`tokens` when none does).
    mean_first_divergence: f64,
}

/// Runs the comparison: `seeds` generations of `tokens` tokens per model, precision and
/// decoding. One JSON line per model, narrow precision and decoding.
pub fn run(tokens: usize, seeds: usize) -> anyhow::Result<()> {
    let demo = crate::demo::checkpoint_or_demo(None)?;
    let demo_text = crate::demo::tokenizer_of(&demo, None);
    let demo_model = checkpoint::Checkpoint::open(&demo)?.load_model(DType::F32, &Device::Cpu)?;
    let tiny = checkpoint::random_model(&Config::tiny(4), 0.02, 0, DType::F32, &Device::Cpu)?;
    for (name, model, tokenizer) in [("demo", demo_model, demo_text), ("tiny", tiny, None)] {
        let bos = Text::load(tokenizer.as_deref(), model.config().vocab_size)?.bos;
        let mut model = model;
        for greedy in [false, true] {
            model = model.with_kv_dtype(DType::F32)?;
            let run = Run {
                bos,
                tokens,
                seeds,
                greedy,
            };
            let reference = run.generations(&model)?;
            for (kv_name, kv) in [("bf16", DType::BF16), ("f16", DType::F16)] {
                model = model.with_kv_dtype(kv)?;
                let narrow = run.generations(&model)?;
                let line = run.compare((name, kv_name), &reference, &narrow);
                println!("{}", serde_json::to_string(&line)?);
            }
        }
    }
    Ok(())
}

/// The generations compared: `seeds` of `tokens` tokens from `bos`, sampled or greedy.
struct Run {
    bos: u32,
    tokens: usize,
    seeds: usize,
    greedy: bool,
}

impl Run {
    /// The tokens of each seed's generation.
    fn generations(&self, model: &Bd3lm) -> anyhow::Result<Vec<Vec<u32>>> {
        let params = SamplingParams {
            greedy: self.greedy,
            ..SamplingParams::new(model.config().block_size)
        };
        (0..self.seeds as u64)
            .map(|seed| {
                let mut session = Session::start(model, &[self.bos])?;
                let mut rules = StopRules::new(self.tokens, None, Vec::new(), None);
                let out = generate(&mut session, &params, seed, &mut rules, None, |_, _| {})?;
                Ok(out.tokens)
            })
            .collect()
    }

    /// How closely the generations of (model, precision) `names`, `narrow`, follow the
    /// f32 `reference`.
    fn compare(
        &self,
        names: (&'static str, &'static str),
        reference: &[Vec<u32>],
        narrow: &[Vec<u32>],
    ) -> Agreement {
        let tokens = self.tokens;
        let (mut equal, mut identical, mut first) = (0, 0, 0);
        for (a, b) in reference.iter().zip(narrow) {
            equal += a.iter().zip(b).filter(|(x, y)| x == y).count();
            let divergence = a.iter().zip(b).position(|(x, y)| x != y);
            identical += usize::from(divergence.is_none() && a.len() == b.len());
            first += divergence.unwrap_or(tokens);
        }
        let seeds = reference.len();
        Agreement {
            model: names.0,
            kv_dtype: names.1,
            greedy: self.greedy,
            seeds,
            tokens,
            identical,
            agreement: equal as f64 / (seeds * tokens).max(1) as f64,
            mean_first_divergence: first as f64 / seeds.max(1) as f64,
        }
    }
}
