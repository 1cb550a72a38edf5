//! `bd3lm generate`: local generation in one process, streaming each committed block.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, bail};
use bd3lm_diffusion::{SamplingParams, Session, StopRules, generate};
use bd3lm_model::checkpoint::Checkpoint;
use bd3lm_text::{Decoder, Text};

use crate::args::GenerateArgs;

/// Runs a local generation, streaming text to stdout and a summary line to stderr.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let flags = &args.generation;
    if flags.max_tokens == 0 {
        bail!("invalid parameter `max_tokens`: expected at least 1, found 0");
    }
    let checkpoint = crate::demo::checkpoint_or_demo(args.checkpoint.as_deref())?;
    let model = args
        .device
        .precision()
        .load_model(Checkpoint::open(&checkpoint)?, &args.device.device()?)?;
    let params = flags
        .sampling
        .overrides()
        .apply(&SamplingParams::new(model.config().block_size))?;
    let tokenizer = crate::demo::tokenizer_of(&checkpoint, args.tokenizer.as_deref());
    let text = Text::load(tokenizer.as_deref(), model.config().vocab_size)?;
    let prompt = match (&flags.prompt, &flags.prompt_ids) {
        (Some(p), _) => text.encode_prompt(p).context("--prompt")?,
        (None, Some(ids)) => ids.clone(),
        (None, None) => vec![text.bos],
    };
    if !flags.stop.is_empty() && !text.has_tokenizer() {
        bail!("--stop needs a tokenizer");
    }
    let mut rules = StopRules::new(
        flags.max_tokens,
        flags.var_length.then_some(text.eos),
        flags.stop_ids.clone(),
        text.stop_hook(flags.stop.clone()),
    );
    let seed = flags.seed.unwrap_or_else(rand::random);
    let started = Instant::now();
    let mut session = Session::start(&model, &prompt)?;
    let mut decoder = Decoder::new(&text);
    let mut stdout = std::io::stdout().lock();
    let out = generate(&mut session, &params, seed, &mut rules, None, |_, new| {
        let _ = write!(stdout, "{}", decoder.push(new));
        let _ = stdout.flush();
    })?;
    let _ = writeln!(stdout, "{}", decoder.finish());
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
