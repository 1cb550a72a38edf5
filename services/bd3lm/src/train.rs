//! `bd3lm train-tokenizer`, `gpt2-tokenizer`, `prepare-data` and `train`: the training
//! path on the command line, with progress bars.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use bd3lm_config::{Decay, Recipe};
use bd3lm_diffusion::NoiseSchedule;
use bd3lm_model::{Backbone, Config};
use bd3lm_text::{Text, bpe, text_files};
use bd3lm_training::data::{self, PrepareOptions, ShardIndex};
use bd3lm_training::{Event, Init, TrainOptions, Trainer};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

/// Arguments of `bd3lm train-tokenizer`.
#[derive(Debug, Args)]
pub struct TokenizerArgs {
    /// Text files or directories (walked for --extension files).
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Ids of the tokenizer (the model appends [MASK] after them).
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Pairs seen fewer times are not merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Extension of the files taken from directories.
    #[arg(long, default_value = "txt")]
    pub extension: String,
    /// Output tokenizer.json.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Trains a byte-level BPE on the inputs and writes it.
pub fn train_tokenizer(args: &TokenizerArgs) -> anyhow::Result<()> {
    let files = text_files(&args.inputs, &args.extension)?;
    let tokenizer = bpe::train(&files, args.vocab_size, args.min_frequency)?;
    bpe::save(&tokenizer, &args.out)?;
    eprintln!(
        "{}: {} ids from {} files (+ [MASK] in the model)",
        args.out.display(),
        tokenizer.get_vocab_size(true),
        files.len()
    );
    Ok(())
}

/// Arguments of `bd3lm gpt2-tokenizer`.
#[derive(Debug, Args)]
pub struct Gpt2Args {
    /// OpenAI's encoder.json.
    #[arg(long, value_name = "FILE")]
    pub encoder: PathBuf,
    /// OpenAI's vocab.bpe (the merges).
    #[arg(long, value_name = "FILE")]
    pub merges: PathBuf,
    /// Output tokenizer.json.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Builds GPT-2's tokenizer from its published files.
pub fn gpt2_tokenizer(args: &Gpt2Args) -> anyhow::Result<()> {
    let tokenizer = bpe::gpt2(&args.encoder, &args.merges)?;
    bpe::save(&tokenizer, &args.out)?;
    Ok(())
}

/// Arguments of `bd3lm prepare-data`.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Text files or directories (walked for --extension files); one document per file.
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// tokenizer.json (copied into the output).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: PathBuf,
    /// Output shard directory.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Tokens per row: the model length n.
    #[arg(long, default_value_t = 1024)]
    pub model_length: usize,
    /// Every N-th document is held out for validation (0: none).
    #[arg(long, default_value_t = 20)]
    pub val_every: usize,
    /// Rows per shard file.
    #[arg(long, default_value_t = 16384)]
    pub shard_rows: usize,
    /// Extension of the files taken from directories.
    #[arg(long, default_value = "txt")]
    pub extension: String,
}

/// Tokenizes and wraps the inputs into shards.
pub fn prepare_data(args: &PrepareArgs) -> anyhow::Result<ShardIndex> {
    let files = text_files(&args.inputs, &args.extension)?;
    let text = Text::load(Some(&args.tokenizer), 0)?;
    let (vocab_size, mask_id) = text.model_vocab().context("the tokenizer")?;
    let opts = PrepareOptions {
        row_length: args.model_length,
        val_every: args.val_every,
        shard_rows: args.shard_rows,
        vocab_size,
        mask_id,
        ..PrepareOptions::default()
    };
    let bar = bar(
        0,
        "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    );
    let index = data::prepare(&files, &text, &args.out, &opts, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let copy = args.out.join("tokenizer.json");
    std::fs::copy(&args.tokenizer, &copy)
        .with_context(|| format!("copying to {}", copy.display()))?;
    eprintln!(
        "{}: train {} rows ({} documents, {} tokens), validation {} rows ({} documents, {} tokens) of {} tokens",
        args.out.display(),
        index.train.rows,
        index.train.documents,
        index.train.tokens,
        index.validation.rows,
        index.validation.documents,
        index.validation.tokens,
        index.row_length
    );
    Ok(index)
}

/// Learning-rate decay after warm-up.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DecayArg {
    /// Constant (the paper).
    Constant,
    /// Cosine to a tenth of the peak.
    Cosine,
}

/// Arguments of `bd3lm train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Run directory: checkpoint/, resume/ and metrics.jsonl.
    #[arg(long, value_name = "DIR", required_unless_present = "addr")]
    pub out: Option<PathBuf>,
    /// Submit the run as a job to the Training service at HOST:PORT (`bd3lm serve`, the
    /// coordinator) instead of training here, and follow it; --data must be on storage
    /// the server shares.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["out", "resume", "init_from"])]
    pub addr: Option<String>,
    /// With --addr: the registry name to publish the result under.
    #[arg(long, requires = "addr")]
    pub name: Option<String>,
    /// With --addr: start from a published version's weights (NAME or NAME@VERSION).
    #[arg(long, value_name = "NAME[@VERSION]", requires = "addr")]
    pub fine_tune: Option<String>,
    /// With --addr: also publish a version at every save.
    #[arg(long, requires = "addr")]
    pub publish_each_save: bool,
    /// With --addr: print the job's id and return instead of following it.
    #[arg(long, requires = "addr")]
    pub detach: bool,
    /// With --addr: the API key and TLS towards the server.
    #[command(flatten)]
    pub credentials: crate::remote::Credentials,
    /// Continue the run in --out from its resume state (other options are the run's).
    #[arg(long)]
    pub resume: bool,
    /// Shard directory from prepare-data.
    #[arg(long, value_name = "DIR", required_unless_present = "resume")]
    pub data: Option<PathBuf>,
    /// Start from this checkpoint's weights instead of a new network.
    #[arg(long, value_name = "DIR")]
    pub init_from: Option<PathBuf>,
    /// Block size L' (1 trains the autoregressive special case); with --init-from, the
    /// block size to fine-tune to.
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Hidden width d of a new network.
    #[arg(long, default_value_t = 256)]
    pub hidden_dim: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub n_heads: usize,
    /// Transformer layers.
    #[arg(long, default_value_t = 4)]
    pub n_blocks: usize,
    /// Width of the conditioning vector.
    #[arg(long, default_value_t = 128)]
    pub cond_dim: usize,
    /// Rows per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub accumulate: usize,
    /// Optimiser steps (with --resume: the new total).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 2500)]
    pub warmup: u64,
    /// Learning rate after warm-up.
    #[arg(long, value_enum, default_value_t = DecayArg::Constant)]
    pub decay: DecayArg,
    /// Largest gradient norm.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// EMA decay of the exported weights.
    #[arg(long, default_value_t = 0.9999)]
    pub ema: f64,
    /// Seed of the weights, data order and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Steps between validations (0: at the end only).
    #[arg(long, default_value_t = 500)]
    pub val_every: u64,
    /// Held-out batches per validation.
    #[arg(long, default_value_t = 8)]
    pub val_batches: usize,
    /// Steps between checkpoints (0: at the end only).
    #[arg(long, default_value_t = 500)]
    pub save_every: u64,
    /// Keep the noise interval at [1e-3, 1] instead of searching the clipped schedule.
    #[arg(long)]
    pub no_clip_search: bool,
    /// Masking schedule: loglinear, cosine, square, square_root or log.
    #[arg(long, default_value = "loglinear")]
    pub schedule: NoiseSchedule,
    /// Dtype of the exported weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub save_dtype: String,
    /// Data-parallel ranks, each taking --batch-size rows of every micro-batch on its own
    /// device.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub world_size: u32,
    /// Where the ranks train (local runs; a job trains where its trainer does).
    #[arg(long, value_enum, default_value_t = bd3lm_trainer::TrainDevice::Cpu, conflicts_with = "addr")]
    pub device: bd3lm_trainer::TrainDevice,
    /// Prometheus gauges of the run (step, loss, tokens/s, validation).
    #[command(flatten)]
    pub metrics: bd3lm_telemetry::metrics::MetricsArgs,
}

/// Trains (or resumes) a run, with a progress bar and a one-line summary per validation.
pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    bd3lm_training::retain_freed_memory();
    args.metrics.install()?;
    bd3lm_training::trainer::describe_metrics();
    let out = args
        .out
        .as_deref()
        .context("--out is required without --addr")?;
    let devices = args.device.devices(args.world_size as usize)?;
    let mut trainer = if args.resume {
        Trainer::resume_on(out, args.steps, &devices)?
    } else {
        new_trainer(args, out, &devices)?
    };
    let opts = trainer.options().clone();
    let cfg = trainer.config();
    eprintln!(
        "training {} parameters (d {}, {} layers, {} heads, vocab {}, n {}, L' {}) for {} steps of {} tokens",
        trainer.parameters(),
        cfg.hidden_dim,
        cfg.n_blocks,
        cfg.n_heads,
        cfg.vocab_size,
        cfg.model_length,
        cfg.block_size,
        opts.steps,
        trainer.tokens_per_step()
    );
    let bar = bar(opts.steps, "{bar:30} {pos}/{len} {msg} eta {eta}");
    bar.set_position(trainer.step());
    trainer.run(|event| match event {
        Event::Step(s) => {
            bar.set_position(s.step);
            bar.set_message(format!("loss {:.3} {:.0} tok/s", s.loss, s.tokens_per_s));
        }
        Event::Validation(v) => bar.println(format!(
            "step {}: validation NELBO {:.4} nats/token, perplexity bound {:.2}; clipped interval [{:.3}, {:.3}]",
            v.step, v.nll, v.ppl, v.eps_min, v.eps_max
        )),
        Event::Saved(dir) => bar.println(format!("saved {}", dir.display())),
    })?;
    bar.finish_and_clear();
    Ok(())
}

impl TrainArgs {
    /// The size of a new network as the flags give it.
    pub fn backbone(&self) -> Backbone {
        Backbone {
            hidden_dim: self.hidden_dim,
            n_heads: self.n_heads,
            n_blocks: self.n_blocks,
            cond_dim: self.cond_dim,
        }
    }

    /// The run's recipe as the flags give it.
    pub fn recipe(&self) -> Recipe {
        Recipe {
            batch_size: self.batch_size,
            accumulate: self.accumulate,
            steps: self.steps.unwrap_or(Recipe::default().steps),
            lr: self.lr,
            warmup: self.warmup,
            decay: match self.decay {
                DecayArg::Constant => Decay::Constant,
                DecayArg::Cosine => Decay::Cosine,
            },
            grad_clip: self.clip,
            ema: self.ema,
            seed: self.seed,
            val_every: self.val_every,
            val_batches: self.val_batches,
            save_every: self.save_every,
            clip_search: !self.no_clip_search,
            world_size: self.world_size,
        }
    }
}

fn new_trainer(
    args: &TrainArgs,
    out: &Path,
    devices: &[candle_core::Device],
) -> anyhow::Result<Trainer> {
    let data = args.data.clone().expect("required unless --resume");
    let index = ShardIndex::open(&data)?;
    let mut opts = TrainOptions::from_recipe(data, &args.recipe());
    opts.schedule = args.schedule;
    opts.save_dtype = args.save_dtype.clone();
    if out.join(bd3lm_training::trainer::RESUME_DIR).exists() {
        bail!(
            "{} already holds a run: add --resume to continue it, or choose another --out",
            out.display()
        );
    }
    let init = match &args.init_from {
        Some(dir) => Init::Checkpoint {
            dir: dir.clone(),
            block_size: args.block_size,
        },
        None => Init::Scratch(scratch_config(args, &index)?),
    };
    Ok(Trainer::new_on(out, opts, init, devices)?)
}

fn scratch_config(args: &TrainArgs, index: &ShardIndex) -> anyhow::Result<Config> {
    let backbone = Backbone {
        hidden_dim: args.hidden_dim,
        n_heads: args.n_heads,
        n_blocks: args.n_blocks,
        cond_dim: args.cond_dim,
    };
    let block_size = args.block_size.unwrap_or(4);
    Ok(bd3lm_jobs::spec::scratch_config(
        index, backbone, block_size,
    )?)
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template(template).expect("a valid template"));
    bar
}
