//! The arguments of `bd3lm generate`, shared by local generation ([`crate::generate`])
//! and the gRPC client ([`crate::client`]).

use std::path::PathBuf;

use bd3lm_sampling::{SamplerKind, SamplingOverrides};
use bd3lm_worker::DeviceArgs;
use clap::Args;

/// The prompt, the stop rules and the sampling flags the user gave.
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
    /// How each block is denoised.
    #[command(flatten)]
    pub sampling: SamplingArgs,
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

/// The sampling flags: only those given become overrides, so that a continued session
/// keeps its own for the rest.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Denoising steps per block (T).
    /// [default: the block size; a continued session keeps its own]
    #[arg(long)]
    pub steps: Option<usize>,
    /// Update rule of each step.
    /// [default: first-hitting; a continued session keeps its own]
    #[arg(long, value_enum)]
    pub sampler: Option<SamplerKind>,
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
    /// Keep only the K most likely tokens; 0 keeps all (clears a continued session's).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Take the most likely token instead of drawing (`--greedy false` turns it off for a
    /// continued session).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub greedy: Option<bool>,
}

impl SamplingArgs {
    /// Exactly the sampling parameters given on the command line: the rest are the
    /// defaults for a new generation and the session's own for a continuation.
    pub fn overrides(&self) -> SamplingOverrides {
        SamplingOverrides {
            sampler: self.sampler,
            steps: self.steps,
            threshold: self.threshold,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k.map(|k| (k > 0).then_some(k)),
            greedy: self.greedy,
        }
    }
}

/// Arguments of `bd3lm generate`: local (the demo model, or `--checkpoint`), or a client
/// of a server with `--addr`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Generate through the server at HOST:PORT (`bd3lm serve`, the coordinator).
    #[arg(long, env = "BD3LM_SERVER", value_name = "HOST:PORT", conflicts_with_all = ["checkpoint", "tokenizer"])]
    pub addr: Option<String>,
    /// With --addr: continue this session.
    #[arg(long, value_name = "ID", requires = "addr")]
    pub session: Option<String>,
    /// With --addr: the API key, sent as `authorization: Bearer <key>` (prefer the
    /// environment variable: a flag shows in the process list).
    #[arg(
        long,
        env = "BD3LM_API_KEY",
        value_name = "KEY",
        hide_env_values = true,
        requires = "addr"
    )]
    pub api_key: Option<String>,
    /// With --addr: TLS towards the server (its CA; a certificate and key when it asks for
    /// one).
    #[command(flatten)]
    pub tls: bd3lm_proto::tls::TlsFiles,
    /// With --addr: when the server writes this generation's KV state to its store
    /// (default: the server's --kv-persistence).
    #[arg(long, value_enum, requires = "addr")]
    pub kv_persistence: Option<bd3lm_coordinator::Persistence>,
    /// With --addr: this generation's priority among its API key's (higher first).
    #[arg(
        long,
        default_value_t = 0,
        allow_hyphen_values = true,
        requires = "addr"
    )]
    pub priority: i32,
    /// With --addr: the served model to generate with (the server's default without it;
    /// `grpcurl ... ListServedModels` lists them).
    #[arg(long = "served-model", value_name = "MODEL", requires = "addr")]
    pub served_model: Option<String>,
    /// Checkpoint directory (config.json + model.safetensors); default: the bundled demo
    /// model.
    #[arg(long, value_name = "DIR")]
    pub checkpoint: Option<PathBuf>,
    /// tokenizer.json; default: the checkpoint directory's.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

/// The generation flags `flags` parse to, for tests.
#[cfg(test)]
pub fn parse(flags: &[&str]) -> GenerationArgs {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerationArgs,
    }
    let argv = std::iter::once("bd3lm").chain(flags.iter().copied());
    <Cli as clap::Parser>::try_parse_from(argv).unwrap().args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(flags: &[&str]) -> SamplingOverrides {
        parse(flags).sampling.overrides()
    }

    /// Only the flags given become overrides, so a continued greedy session stays greedy
    /// and a top-k can be cleared.
    #[test]
    fn only_given_flags_are_sent() {
        assert_eq!(sampling(&[]), SamplingOverrides::default());
        assert_eq!(sampling(&["--greedy"]).greedy, Some(true));
        assert_eq!(sampling(&["--greedy", "false"]).greedy, Some(false));
        assert_eq!(sampling(&["--top-k", "0"]).top_k, Some(None));
        assert_eq!(sampling(&["--top-k", "7"]).top_k, Some(Some(7)));
        let o = sampling(&["--sampler", "confidence", "--threshold", "0.5"]);
        assert_eq!(
            (o.sampler, o.threshold),
            (Some(SamplerKind::Confidence), Some(0.5))
        );
    }
}
