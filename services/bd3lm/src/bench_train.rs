//! `bd3lm bench train`: training throughput on the CPU (forward, backward and optimiser
//! step) and peak memory, for the demo model's shape and the "tiny" shape.

use std::time::Instant;

use bd3lm_model::{Backbone, Config, Shape};
use bd3lm_training::data::{PrepareOptions, ShardWriter, Split};
use bd3lm_training::{Init, TrainOptions, Trainer};
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// One measured shape.
#[derive(Debug, Serialize)]
struct TrainBench {
    shape: &'static str,
    parameters: usize,
    vocab_size: usize,
    model_length: usize,
    block_size: usize,
    batch_size: usize,
    tokens_per_step: u64,
    steps: usize,
    ms_per_step: f64,
    tokens_per_s: f64,
    peak_rss_mib: f64,
}

/// Measures `steps` optimiser steps per shape on random tokens, after `warmup` steps (the
/// first steps are slower while the allocator's heap grows to its working size).
pub fn run(steps: usize, warmup: usize, seed: u64) -> anyhow::Result<()> {
    bd3lm_training::retain_freed_memory();
    let shapes = [
        (
            "demo",
            Config::new(Shape {
                vocab_size: 8193,
                model_length: 256,
                block_size: 4,
                backbone: Backbone {
                    hidden_dim: 256,
                    n_heads: 4,
                    n_blocks: 4,
                    cond_dim: 128,
                },
            }),
            8,
        ),
        ("tiny", Config::tiny(4), 1),
    ];
    for (shape, cfg, batch) in shapes {
        let dir = tempfile_dir()?;
        random_shards(&dir, &cfg, batch * (steps + warmup), seed)?;
        let mut opts = TrainOptions::new(dir.join("shards"));
        opts.batch_size = batch;
        opts.steps = (steps + warmup) as u64;
        opts.seed = seed;
        let mut trainer = Trainer::new(&dir.join("run"), opts, Init::Scratch(cfg.clone()))?;
        reset_peak_rss();
        for _ in 0..warmup {
            trainer.train_step()?;
        }
        let started = Instant::now();
        for _ in 0..steps {
            trainer.train_step()?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let report = TrainBench {
            shape,
            parameters: trainer.parameters(),
            vocab_size: cfg.vocab_size,
            model_length: cfg.model_length,
            block_size: cfg.block_size,
            batch_size: batch,
            tokens_per_step: trainer.tokens_per_step(),
            steps,
            ms_per_step: 1e3 * seconds / steps as f64,
            tokens_per_s: (trainer.tokens_per_step() * steps as u64) as f64 / seconds,
            peak_rss_mib: peak_rss_kib() / 1024.0,
        };
        println!("{}", serde_json::to_string(&report)?);
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("bd3lm-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes `rows` rows of uniformly random ids (below the BOS/EOS id) as training shards,
/// plus one validation row.
fn random_shards(
    dir: &std::path::Path,
    cfg: &Config,
    rows: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let eos = (cfg.vocab_size - 2) as u32;
    let opts = PrepareOptions {
        row_length: cfg.model_length,
        vocab_size: cfg.vocab_size,
        mask_id: cfg.mask_id(),
        ..PrepareOptions::default()
    };
    let out = dir.join("shards");
    let mut writer = ShardWriter::new(&out, &opts, eos, eos)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut draw = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.random_range(0..eos)).collect() };
    let body = cfg.model_length - 2;
    writer.push(Split::Train, &draw(rows * body))?;
    writer.push(Split::Validation, &draw(body))?;
    writer.finish("random ids".into())?;
    Ok(())
}

/// Resets the kernel's peak resident set size of this process (Linux; elsewhere a no-op).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size since the last reset, in KiB (0 where unknown).
fn peak_rss_kib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0.0)
}
