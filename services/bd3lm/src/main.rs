//! `bd3lm`: the command line of the BD3-LM system.

mod args;
mod bench;
mod bench_load;
mod bench_precision;
mod bench_serve;
mod bench_train;
mod check_reference;
mod client;
mod demo;
mod eval;
mod generate;
mod jobs;
mod plot;
mod remote;
mod serve;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use bd3lm_model::Config;
use clap::{Parser, Subcommand};

/// Block diffusion language models: conformance checks, benchmarks and generation.
#[derive(Debug, Parser)]
#[command(name = "bd3lm", version, about)]
struct Cli {
    /// CPU threads for matrix products (sets RAYON_NUM_THREADS); default: the cores this
    /// process may use.
    #[arg(long, global = true, env = "BD3LM_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Recompute every output of a reference fixture file and compare it with the stored
    /// values; prints one JSON object, exits 1 when any key fails.
    CheckReference {
        /// Checkpoint directory (config.json + model.safetensors).
        #[arg(long, value_name = "DIR")]
        checkpoint: PathBuf,
        /// Fixture file (safetensors) with the reference's inputs and outputs.
        #[arg(long, value_name = "FILE")]
        fixtures: PathBuf,
        /// Largest allowed absolute difference per key.
        #[arg(long, default_value_t = 1e-4, value_parser = positive_f64, allow_hyphen_values = true)]
        tolerance: f64,
        /// Where the model runs and in what precisions (here the KV cache's precision
        /// defaults to the compute dtype on every device).
        #[command(flatten)]
        device: bd3lm_worker::DeviceArgs,
    },
    /// Generate text, streaming each block as it is committed: locally with
    /// --checkpoint, or through a server with --addr.
    Generate(args::GenerateArgs),
    /// Serve the gRPC Generation API: a coordinator and N denoise workers in one process,
    /// with the in-memory store (or --redis).
    Serve(Box<serve::ServeArgs>),
    /// Train a byte-level BPE tokenizer on text files.
    TrainTokenizer(train::TokenizerArgs),
    /// Build GPT-2's tokenizer.json from OpenAI's encoder.json and vocab.bpe.
    Gpt2Tokenizer(train::Gpt2Args),
    /// Tokenize text files into wrapped rows of model_length tokens, as train and
    /// validation shards.
    PrepareData(train::PrepareArgs),
    /// Train a BD3-LM on prepared shards (or fine-tune a checkpoint, or resume a run);
    /// with --addr, as a job of a running system's Training service.
    Train(train::TrainArgs),
    /// Training jobs of a running system: list, watch, cancel.
    #[command(subcommand)]
    Jobs(jobs::JobsCommand),
    /// The model registry of a running system.
    #[command(subcommand)]
    Models(jobs::ModelsCommand),
    /// Evaluate a checkpoint: perplexity bound on held-out shards, generative perplexity
    /// and unigram entropy of its samples under a judge LM. Prints one JSON object.
    Eval(eval::EvalArgs),
    /// Pictures of runs (PNG or SVG): training curves.
    #[command(subcommand)]
    Plot(plot::PlotCommand),
    /// Benchmarks on random weights: model passes, generation, serving and training.
    #[command(subcommand)]
    Bench(BenchCommand),
}

// Parsed once per process: the size of its largest arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Milliseconds per cached denoise and commit pass while generating from BOS and after
    /// a long context, one token unmasked per pass. One JSON line per run.
    Model {
        /// Block sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "4,16")]
        block_sizes: Vec<usize>,
        /// Tokens to generate per run.
        #[arg(long, default_value_t = 256)]
        tokens: usize,
        /// Prefilled context of the second run of each block size.
        #[arg(long, default_value_t = 1024)]
        context: usize,
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Serving costs: per-block latency with the KV cache in memory, from the store, or
    /// rebuilt from tokens; KV blob encode/decode GB/s; coordinator overhead per block.
    Serve {
        /// Instead of the cost figures: aggregate tokens/s, block and first-block
        /// latency and queue time of this many concurrent streams (a list), through the
        /// coordinator and one worker, on the store given.
        #[arg(long, value_delimiter = ',', value_name = "N,N,..")]
        concurrency: Option<Vec<usize>>,
        /// Instead of the cost figures: one API key sends this many streams at once and a
        /// second key one stream; the second's time to its first block, against it alone
        /// (the keys take turns at the worker's slots).
        #[arg(long, value_name = "N", conflicts_with = "concurrency")]
        burst: Option<usize>,
        /// Instead of the cost figures: 16 streams of prompts of this many tokens (each
        /// its own seed), after one stream of each prompt; with one worker, with its
        /// prefix cache and without, with several, with prefix-aware routing and without:
        /// time to the first block and token, tokens/s, KV memory, the busiest worker's
        /// share of blocks, and whether every stream's tokens were the same both ways.
        #[arg(long, value_name = "TOKENS", conflicts_with_all = ["concurrency", "burst"])]
        shared_prefix: Option<usize>,
        /// With --shared-prefix: distinct prompts (from their first token) the streams
        /// take in turn.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
        prompts: u64,
        /// With --shared-prefix: workers behind the coordinator, in this process.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
        workers: u64,
        /// With --concurrency, --burst or --shared-prefix: the random-weight tiny or small
        /// shape, or the bundled demo model.
        #[arg(long, value_enum, default_value_t = BenchModel::Tiny)]
        model: BenchModel,
        /// With --concurrency, --burst or --shared-prefix: new tokens per stream (of the
        /// burst).
        #[arg(long, default_value_t = 64)]
        tokens: u32,
        /// With --concurrency: the coordinator's --max-run-blocks (1: a worker call per
        /// block, as before block runs).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
        max_run_blocks: u32,
        /// Where the model runs and in what precisions (without --concurrency, only
        /// --kv-dtype applies: the cost figures are taken on the CPU in f32).
        #[command(flatten)]
        device: bd3lm_worker::DeviceArgs,
        #[command(flatten)]
        worker: bd3lm_worker::WorkerSettings,
        /// The store: Redis with --redis or --redis-cluster, else in memory.
        #[command(flatten)]
        store: bd3lm_kvstore::StoreArgs,
        /// Context lengths (prompt tokens) to measure at.
        #[arg(long, value_delimiter = ',', default_value = "256,1024")]
        contexts: Vec<usize>,
        /// Repetitions per figure.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Training throughput on random tokens (forward, backward, clipping, AdamW and EMA)
    /// and peak memory, for the demo model's shape and the tiny shape. One JSON line each.
    Train {
        /// Measured steps per shape.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Unmeasured steps before them.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Seed of the weights and tokens.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Token agreement of KV caches held in bf16 and f16 with f32's: the same seeds'
    /// generations from BOS, sampled and greedy, on the demo model and the random-weight
    /// tiny shape. One JSON line per model, precision and decoding.
    KvPrecision {
        /// Tokens per generation.
        #[arg(long, default_value_t = 256)]
        tokens: usize,
        /// Generations (seeds 0..N) per model and precision.
        #[arg(long, default_value_t = 8)]
        seeds: usize,
    },
    /// Tokens per second of local generation from BOS (first-hitting, T = block size,
    /// nucleus 0.9) and the confidence sampler's forward passes per token.
    Generate {
        /// Block sizes to measure.
        #[arg(long, value_delimiter = ',', default_value = "4,16")]
        block_sizes: Vec<usize>,
        /// Tokens to generate per run.
        #[arg(long, default_value_t = 256)]
        tokens: usize,
        /// Threshold of the confidence sampler.
        #[arg(long, default_value_t = 0.9)]
        threshold: f64,
        /// Seed of the weights and of the sampling.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// The model of `bench serve --concurrency`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchModel {
    /// Random weights, d 256, 8 layers, vocabulary 50258, block size 4.
    Tiny,
    /// Random weights, d 768, 12 layers, 12 heads, vocabulary 50258, context 1024, block
    /// size 4: the paper's small shape.
    Small,
    /// The bundled demo model.
    Demo,
}

/// The model of `bench serve --concurrency`, `--burst` or `--shared-prefix`, loaded as
/// `device` says, its name, and the limits of its workers from `worker`.
async fn bench_model(
    model: BenchModel,
    device: &bd3lm_worker::DeviceArgs,
    worker: &bd3lm_worker::WorkerSettings,
) -> anyhow::Result<(
    Arc<bd3lm_worker::LoadedModel>,
    &'static str,
    bd3lm_worker::WorkerLimits,
)> {
    let (dev, precision) = (device.device()?, device.precision());
    let limits = worker.limits(device.device);
    let (loaded, name) = match model {
        BenchModel::Tiny => (
            bench_serve::random_model(Config::tiny(4), precision, dev).await?,
            "tiny",
        ),
        BenchModel::Small => (
            bench_serve::random_model(Config::small(4), precision, dev).await?,
            "small",
        ),
        BenchModel::Demo => {
            let dir = demo::checkpoint_or_demo(None)?;
            let load = move || bd3lm_worker::load(&dir, None, precision, &dev);
            (Arc::new(tokio::task::spawn_blocking(load).await??), "demo")
        }
    };
    Ok((loaded, name, limits))
}

fn positive_f64(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("expected a positive number, found {s:?}")),
    }
}

fn main() -> ExitCode {
    let cli: Cli = bd3lm_telemetry::cli::parse_args();
    // `serve` runs the built-in trainer beside its workers: a training step on the
    // calling thread's element-wise kernels is 40% slower.
    let workload = match &cli.command {
        Command::Train(_)
        | Command::Eval(_)
        | Command::Serve(_)
        | Command::Bench(BenchCommand::Train { .. }) => bd3lm_model::Workload::Training,
        _ => bd3lm_model::Workload::Inference,
    };
    // SAFETY: no other thread exists yet (the runtime starts below).
    unsafe { bd3lm_model::set_host_threads(cli.threads.map(usize::from), workload) };
    // One runtime for the commands that serve or call gRPC, and for span export.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            return bd3lm_telemetry::cli::fail(
                &anyhow::Error::new(e).context("starting the async runtime"),
            );
        }
    };
    let _runtime = runtime.enter();
    let _telemetry = match bd3lm_telemetry::init("bd3lm", "warn") {
        Ok(g) => g,
        Err(e) => return bd3lm_telemetry::cli::fail(&e.context("tracing")),
    };
    match run(cli, runtime.handle()) {
        Ok(code) => code,
        Err(err) => bd3lm_telemetry::cli::fail(&err),
    }
}

fn run(cli: Cli, runtime: &tokio::runtime::Handle) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckReference {
            checkpoint,
            fixtures,
            tolerance,
            device,
        } => {
            let (dev, precision) = (device.device()?, device.exact_precision());
            let report = check_reference::run(&checkpoint, &fixtures, tolerance, &dev, precision)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(if report.pass {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::TrainTokenizer(args) => {
            train::train_tokenizer(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gpt2Tokenizer(args) => {
            train::gpt2_tokenizer(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::PrepareData(args) => {
            train::prepare_data(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot(command) => {
            plot::run(command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval(args) => {
            eval::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(args) => match &args.addr {
            Some(addr) => Ok(success(runtime.block_on(jobs::submit(&args, addr))?)),
            None => {
                train::train(&args)?;
                Ok(ExitCode::SUCCESS)
            }
        },
        Command::Jobs(command) => Ok(success(runtime.block_on(jobs::jobs(command))?)),
        Command::Models(command) => {
            runtime.block_on(jobs::models(command))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            runtime.block_on(serve::run(*args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate(args) => {
            match &args.addr {
                Some(addr) => runtime.block_on(client::generate(addr, &args))?,
                None => generate::run(&args)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(command) => {
            bench(command, runtime)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Exit code 0 for a success, 1 otherwise (a job that failed or was cancelled).
fn success(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn bench(command: BenchCommand, runtime: &tokio::runtime::Handle) -> anyhow::Result<()> {
    match command {
        BenchCommand::Serve {
            shared_prefix: Some(prompt),
            prompts,
            workers,
            model,
            tokens,
            device,
            worker,
            ..
        } => runtime.block_on(async {
            let (loaded, _, limits) = bench_model(model, &device, &worker).await?;
            let bench = bench_load::SharedPrefix {
                prompt,
                prompts: prompts as usize,
                streams: 16,
                tokens,
                workers: workers as usize,
            };
            bench_load::shared_prefix(loaded, limits, bench).await
        }),
        BenchCommand::Serve {
            burst: Some(burst),
            model,
            tokens,
            device,
            worker,
            ..
        } => runtime.block_on(async {
            let (loaded, _, limits) = bench_model(model, &device, &worker).await?;
            bench_load::fairness(loaded, limits, burst, tokens).await
        }),
        BenchCommand::Serve {
            concurrency: Some(levels),
            model,
            tokens,
            max_run_blocks,
            device,
            worker,
            store,
            ..
        } => runtime.block_on(async {
            let (loaded, name, limits) = bench_model(model, &device, &worker).await?;
            let stores = store.open()?;
            let load = bench_load::Load {
                levels,
                tokens,
                max_run_blocks,
            };
            bench_load::run(loaded, name, limits, stores, load).await
        }),
        BenchCommand::Serve {
            store,
            device,
            contexts,
            reps,
            ..
        } => {
            let kv_dtype = device.precision().kv;
            runtime.block_on(bench_serve::run(store.open()?, kv_dtype, &contexts, reps))
        }
        BenchCommand::Generate {
            block_sizes,
            tokens,
            threshold,
            seed,
        } => bench::run_generate(&block_sizes, tokens, threshold, seed),
        BenchCommand::KvPrecision { tokens, seeds } => bench_precision::run(tokens, seeds),
        BenchCommand::Train {
            steps,
            warmup,
            seed,
        } => bench_train::run(steps, warmup, seed),
        BenchCommand::Model {
            block_sizes,
            tokens,
            context,
            seed,
        } => bench::run(&block_sizes, tokens, context, seed),
    }
}
