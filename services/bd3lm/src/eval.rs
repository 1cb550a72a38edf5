//! `bd3lm eval`: the perplexity bound on held-out shards, and the generative perplexity
//! and unigram entropy of the model's own samples judged by a real causal LM.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bd3lm_diffusion::SamplingParams;
use bd3lm_diffusion::schedule::Interval;
use bd3lm_model::checkpoint::{self, Checkpoint};
use bd3lm_model::{Bd3lm, Config};
use bd3lm_text::Text;
use bd3lm_training::bound::{self, Bound, ObjectiveVariance};
use bd3lm_training::data::{Loader, Position, Split};
use bd3lm_training::eval::{self, SampleReport};
use bd3lm_training::judge::Judge;
use candle_core::{DType, Device};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::args::SamplingArgs;

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
    /// How the samples are drawn.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Held-out batches (of --batch-size rows) over which to estimate the variance of the
    /// training objective, under the checkpoint's clipped interval and under [1e-3, 1]
    /// (needs --data; 0: none).
    #[arg(long, default_value_t = 0)]
    pub variance_batches: usize,
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

/// What `bd3lm eval` prints, and what `bd3lm plot` reads back.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    /// The checkpoint directory evaluated.
    pub checkpoint: PathBuf,
    /// Whether a freshly initialised network of its shape was evaluated instead.
    pub untrained: bool,
    /// What the figures are of.
    pub model: ModelFacts,
    /// The perplexity bound on the held-out rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<Bound>,
    /// Under the checkpoint's training interval, then under [1e-3, 1] (once when they are
    /// the same).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objective_variance: Vec<ObjectiveVariance>,
    /// How the samples were drawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingParams>,
    /// The samples' figures under the judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<SampleReport>,
    /// The same judge on held-out rows cut to the samples' length: real text, for scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<SampleReport>,
}

/// What the figures are of: the model's shape and, when the checkpoint sits in a run
/// directory, how long it was trained.
#[derive(Debug, Serialize, Deserialize)]
pub struct ModelFacts {
    /// Block size L'.
    pub block_size: usize,
    /// Context length n.
    pub model_length: usize,
    /// Parameters of the network.
    pub parameters: usize,
    /// Lower end of the clipped noise interval it was trained with.
    pub eps_min: f64,
    /// Its upper end.
    pub eps_max: f64,
    /// Optimiser steps of its run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_steps: Option<u64>,
    /// Tokens its run trained on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trained_tokens: Option<u64>,
}

impl ModelFacts {
    /// The facts of the checkpoint in `dir` (of config `cfg`), or of an untrained network
    /// of its shape.
    fn of(cfg: &Config, dir: &Path, untrained: bool) -> Self {
        let (trained_steps, trained_tokens) = match untrained {
            false => trained(dir).unzip(),
            true => (Some(0), Some(0)),
        };
        Self {
            block_size: cfg.block_size,
            model_length: cfg.model_length,
            parameters: checkpoint::tensor_specs(cfg)
                .iter()
                .map(|(_, shape)| shape.iter().product::<usize>())
                .sum(),
            eps_min: cfg.sampling_eps_min,
            eps_max: cfg.sampling_eps_max,
            trained_steps,
            trained_tokens,
        }
    }
}

/// The last training step of the run whose `checkpoint/` is `dir`, from its metrics log:
/// (steps, tokens).
fn trained(dir: &Path) -> Option<(u64, u64)> {
    let log = dir.parent()?.join(bd3lm_training::trainer::METRICS_FILE);
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|line| {
        let value: serde_json::Value = serde_json::from_str(line).ok()?;
        (value["kind"] == "train").then_some(())?;
        Some((value["step"].as_u64()?, value["tokens"].as_u64()?))
    })
}

/// The samples' parameters: the defaults for `block_size` with the flags given.
fn sampling_params(args: &EvalArgs, block_size: usize) -> anyhow::Result<SamplingParams> {
    let overrides = args.sampling.overrides();
    Ok(overrides.apply(&SamplingParams::new(block_size))?)
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
    if args.variance_batches == 1 || (args.variance_batches > 0 && args.data.is_none()) {
        bail!("--variance-batches: needs --data and at least 2 batches (a variance)");
    }
    let dir = crate::demo::checkpoint_or_demo(args.checkpoint.as_deref())?;
    let ckpt = Checkpoint::open(&dir)?;
    let cfg = ckpt.config.clone();
    // Checked before anything slow is loaded.
    let sampling = match args.judge {
        Some(_) => Some(sampling_params(args, cfg.block_size)?),
        None => None,
    };
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
    let (samples, held_out) = match (&args.judge, &sampling) {
        (Some(judge), Some(params)) => {
            let (samples, held_out) = judged(&model, &dir, args, judge, params)?;
            (Some(samples), held_out)
        }
        _ => (None, None),
    };
    let report = Report {
        model: ModelFacts::of(&cfg, &dir, args.untrained),
        objective_variance: objective_variances(&model, args)?,
        checkpoint: dir,
        untrained: args.untrained,
        bound,
        sampling,
        samples,
        held_out,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The training objective's variance under the model's clipped interval, then under
/// [1e-3, 1] (once when they are the same, or for AR, whose objective has no noise level),
/// when asked for.
fn objective_variances(model: &Bd3lm, args: &EvalArgs) -> anyhow::Result<Vec<ObjectiveVariance>> {
    let Some(data) = args.data.as_ref().filter(|_| args.variance_batches > 0) else {
        return Ok(Vec::new());
    };
    let cfg = model.config();
    let trained = Interval::new(cfg.sampling_eps_min, cfg.sampling_eps_max)?;
    let mut intervals = vec![Interval::default()];
    if trained != Interval::default() && cfg.block_size > 1 {
        intervals.insert(0, trained);
    }
    intervals
        .into_iter()
        .map(|interval| {
            let (batches, batch) = (args.variance_batches, args.batch_size);
            Ok(bound::objective_variance(
                model, data, batches, batch, args.seed, interval,
            )?)
        })
        .collect()
}

/// The judge's figures of the model's samples and, with `--data`, of as many held-out
/// rows cut to the samples' length.
fn judged(
    model: &Bd3lm,
    dir: &Path,
    args: &EvalArgs,
    judge: &Path,
    params: &SamplingParams,
) -> anyhow::Result<(SampleReport, Option<SampleReport>)> {
    let tokenizer = crate::demo::tokenizer_of(dir, args.tokenizer.as_deref())
        .context("sampling text needs a tokenizer: give --tokenizer")?;
    let text = Text::load(Some(&tokenizer), model.config().vocab_size)?;
    let mut judge = Judge::load(judge)?;
    let (count, length) = (args.samples, args.sample_length);
    let samples = eval::sample_quality(model, &text, &mut judge, params, count, length, args.seed)?;
    let Some(data) = &args.data else {
        return Ok((samples, None));
    };
    let mut loader = Loader::open(data, Split::Validation, None, Position::default())?;
    let rows = (0..count)
        .map(|_| {
            let row = loader.next_batch(1)?;
            Ok(row[1..].iter().take(length).copied().collect())
        })
        .collect::<anyhow::Result<Vec<Vec<u32>>>>()?;
    let held_out = eval::judge_token_texts(&text, &mut judge, &rows)?;
    Ok((samples, Some(held_out)))
}
