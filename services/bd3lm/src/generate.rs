//! `bd3lm generate`: local generation in one process, streaming each committed block.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use bd3lm_diffusion::{Filter, Sampler, SamplingParams, Session, StopRules, generate};
use bd3lm_model::Bd3lm;
use bd3lm_model::checkpoint::Checkpoint;
use bd3lm_text::{Decoder, Text};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};

/// The update rule of each denoising step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SamplerArg {
    /// DDPM steps; a position unmasks with probability (p(t) - p(s)) / p(t).
    Ddpm,
    /// Exactly one masked position per step.
    FirstHitting,
    /// Every position whose top probability exceeds --threshold (at least one per step).
    Confidence,
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The CPU.
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16 (CUDA).
    Bf16,
}

/// The prompt and every sampling parameter; shared by local and remote generation.
#[derive(Debug, Clone, Args)]
pub struct GenerationArgs {
    /// Prompt text (needs a tokenizer); the tokenizer's BOS is put in front.
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, used as given.
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    pub prompt_ids: Option<Vec<u32>>,
    /// Most new tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Denoising steps per block (T); default: the block size.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Update rule of each step.
    /// [default: first-hitting; a continued session keeps its own]
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerArg>,
    /// Probability a position's top token must exceed to unmask (confidence sampler).
    /// [default: 0.9]
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Softmax temperature (> 0).
    /// [default: 1]
    #[arg(long, allow_hyphen_values = true)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this mass, in (0, 1].
    /// [default: 0.9]
    #[arg(long, allow_hyphen_values = true)]
    pub top_p: Option<f64>,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Take the most likely token instead of drawing.
    #[arg(long)]
    pub greedy: bool,
    /// Seed of every random draw; default: a fresh one, printed in the summary.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Variable length: stop after end-of-sequence, or when the text turns repetitive
    /// (last 256 tokens below 4 nats of entropy).
    #[arg(long)]
    pub var_length: bool,
    /// Stop when this text appears (not included); repeatable.
    #[arg(long = "stop", value_name = "TEXT")]
    pub stop: Vec<String>,
    /// Stop when this comma-separated token id sequence appears (not included); repeatable.
    #[arg(long = "stop-ids", value_name = "IDS", value_parser = parse_ids)]
    pub stop_ids: Vec<Vec<u32>>,
}

fn parse_ids(s: &str) -> Result<Vec<u32>, String> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .map_err(|_| format!("expected comma-separated token ids, found {s:?}"))
        })
        .collect()
}

impl GenerationArgs {
    /// The sampling parameters for a model with `block_size`, validated.
    pub fn sampling(&self, block_size: usize) -> anyhow::Result<SamplingParams> {
        let sampler = match self.sampler.unwrap_or(SamplerArg::FirstHitting) {
            SamplerArg::Ddpm => Sampler::Ddpm,
            SamplerArg::FirstHitting => Sampler::FirstHitting,
            SamplerArg::Confidence => Sampler::Confidence {
                threshold: self.threshold.unwrap_or(0.9),
            },
        };
        let params = SamplingParams {
            sampler,
            steps: self.steps.unwrap_or(block_size),
            filter: Filter {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: self.top_k,
                top_p: self.top_p.unwrap_or(0.9),
            },
            greedy: self.greedy,
            ..SamplingParams::new(block_size)
        };
        params.validate()?;
        if self.max_tokens == 0 {
            bail!("invalid parameter `max_tokens`: expected at least 1, found 0");
        }
        Ok(params)
    }
}

/// Arguments of `bd3lm generate`: local with `--checkpoint`, or a client of a server with
/// `--addr`.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Generate through the server at HOST:PORT (`bd3lm serve`, the coordinator).
    #[arg(long, env = "BD3LM_SERVER", value_name = "HOST:PORT", conflicts_with_all = ["checkpoint", "tokenizer"])]
    pub addr: Option<String>,
    /// With --addr: continue this session.
    #[arg(long, value_name = "ID", requires = "addr")]
    pub session: Option<String>,
    /// Checkpoint directory (config.json + model.safetensors); default: the bundled demo
    /// model.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// tokenizer.json; default: the checkpoint directory's.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Where the model runs.
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Compute precision.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

fn load_model(args: &LocalArgs, checkpoint: &std::path::Path) -> anyhow::Result<Bd3lm> {
    let device = match args.device {
        DeviceArg::Cpu => Device::Cpu,
        DeviceArg::Cuda => Device::new_cuda(0).context("--device cuda")?,
    };
    let dtype = match args.dtype {
        DtypeArg::F32 => DType::F32,
        DtypeArg::F16 => DType::F16,
        DtypeArg::Bf16 => DType::BF16,
    };
    Ok(Checkpoint::open(checkpoint)?.load_model(dtype, &device)?)
}

/// Runs a local generation, streaming text to stdout and a summary line to stderr.
pub fn run(args: &LocalArgs) -> anyhow::Result<()> {
    if let Some(addr) = &args.addr {
        let runtime = tokio::runtime::Runtime::new()?;
        return runtime.block_on(crate::client::generate(
            addr,
            args.session.clone(),
            &args.generation,
        ));
    }
    let checkpoint = crate::demo::checkpoint_or_demo(args.checkpoint.as_deref())?;
    let model = load_model(args, &checkpoint)?;
    let params = args.generation.sampling(model.config().block_size)?;
    let tokenizer = crate::demo::tokenizer_of(&checkpoint, args.tokenizer.as_deref());
    let text = Text::load(tokenizer.as_deref(), model.config().vocab_size)?;
    let prompt = match (&args.generation.prompt, &args.generation.prompt_ids) {
        (Some(p), _) => text.encode_prompt(p).context("--prompt")?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => vec![text.bos],
    };
    if !args.generation.stop.is_empty() && !text.has_tokenizer() {
        bail!("--stop needs a tokenizer");
    }
    let mut rules = StopRules {
        eos: args.generation.var_length.then_some(text.eos),
        stop_sequences: args.generation.stop_ids.clone(),
        hook: text.stop_hook(args.generation.stop.clone()),
        ..StopRules::max_tokens(args.generation.max_tokens)
    };
    let seed = args.generation.seed.unwrap_or_else(rand::random);
    let started = Instant::now();
    let mut session = Session::start(&model, &prompt)?;
    let mut decoder = Decoder::new(&text);
    let mut stdout = std::io::stdout().lock();
    let out = generate(&mut session, &params, seed, &mut rules, None, |_, new| {
        let _ = write!(stdout, "{}", decoder.push(new));
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout);
    let secs = started.elapsed().as_secs_f64();
    let n = out.tokens.len();
    eprintln!(
        "tokens {n}, {:.1} tokens/s, forward passes {} ({:.2} per token), blocks {}, stop {}, seed {seed}",
        n as f64 / secs,
        out.forward_passes,
        out.forward_passes as f64 / n.max(1) as f64,
        out.blocks.len(),
        out.stop.name()
    );
    Ok(())
}
