//! `bd3lm eval`: the perplexity bound on held-out shards, and the generative perplexity
//! and unigram entropy of the model's own samples judged by a real causal LM.

use std::path::PathBuf;

use anyhow::{Context, bail};
use bd3lm_diffusion::SamplingParams;
use bd3lm_model::checkpoint::{self, Checkpoint};
use bd3lm_text::Text;
use bd3lm_training::bound::{self, Bound};
use bd3lm_training::data::{Loader, Position, Split};
use bd3lm_training::eval::{self, SampleReport};
use bd3lm_training::judge::Judge;
use candle_core::{DType, Device};
use clap::Args;
use serde::Serialize;

/// Arguments of `bd3lm eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint directory; default: the bundled demo model.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// Shard directory (prepare-data) whose validation rows give the perplexity bound.
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Batches of the bound (default: the whole validation split).
    #[arg(long)]
    pub batches: Option<usize>,
    /// Rows per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Judge model (GGUF, llama architecture) for the generative perplexity.
    #[arg(long, value_name = "FILE")]
    pub judge: Option<PathBuf>,
    /// Samples to judge.
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// Tokens per sample.
    #[arg(long, default_value_t = 256)]
    pub sample_length: usize,
    /// Nucleus (top-p) of the samples.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f64,
    /// Seed of the noise and the samples.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Evaluate a freshly initialised network of the checkpoint's shape instead of its
    /// weights: the figures of an untrained model, for scale.
    #[arg(long)]
    pub untrained: bool,
    /// tokenizer.json; default: the checkpoint directory's.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Report {
    checkpoint: PathBuf,
    untrained: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    bound: Option<Bound>,
    #[serde(skip_serializing_if = "Option::is_none")]
    samples: Option<SampleReport>,
    /// The same judge on held-out rows cut to the samples' length: real text, for scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    held_out: Option<SampleReport>,
}

/// Runs the evaluations asked for and prints one JSON object.
pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    if args.data.is_none() && args.judge.is_none() {
        bail!(
            "nothing to evaluate: give --data (perplexity bound) and/or --judge (generative perplexity)"
        );
    }
    if args.batch_size == 0 || args.samples == 0 || args.sample_length == 0 {
        bail!("--batch-size, --samples and --sample-length must be positive");
    }
    let dir = crate::demo::checkpoint_or_demo(args.checkpoint.as_deref())?;
    let ckpt = Checkpoint::open(&dir)?;
    let cfg = ckpt.config.clone();
    let model = if args.untrained {
        let weights = checkpoint::init_weights(&cfg, args.seed)?;
        checkpoint::from_weights(&cfg, weights, DType::F32, &Device::Cpu)?
    } else {
        ckpt.load_model(DType::F32, &Device::Cpu)?
    };
    let bound = match &args.data {
        Some(data) => Some(bound::perplexity_bound(
            &model,
            data,
            args.batches,
            args.batch_size,
            args.seed,
            None,
        )?),
        None => None,
    };
    let (mut samples, mut held_out) = (None, None);
    if let Some(path) = &args.judge {
        let tokenizer = crate::demo::tokenizer_of(&dir, args.tokenizer.as_deref())
            .context("sampling text needs a tokenizer: give --tokenizer")?;
        let text = Text::load(Some(&tokenizer), cfg.vocab_size)?;
        let mut judge = Judge::load(path)?;
        let mut params = SamplingParams::new(cfg.block_size);
        params.filter.top_p = args.top_p;
        params.validate().context("--top-p")?;
        samples = Some(eval::sample_quality(
            &model,
            &text,
            &mut judge,
            &params,
            args.samples,
            args.sample_length,
            args.seed,
        )?);
        if let Some(data) = &args.data {
            let mut loader = Loader::open(data, Split::Validation, None, Position::default())?;
            let rows = (0..args.samples)
                .map(|_| {
                    let row = loader.next_batch(1)?;
                    Ok(row[1..].iter().take(args.sample_length).copied().collect())
                })
                .collect::<anyhow::Result<Vec<Vec<u32>>>>()?;
            held_out = Some(eval::judge_token_texts(&text, &mut judge, &rows)?);
        }
    }
    let report = Report {
        checkpoint: dir,
        untrained: args.untrained,
        bound,
        samples,
        held_out,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
