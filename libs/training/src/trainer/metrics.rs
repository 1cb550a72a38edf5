//! The metrics of a run: its JSON-lines log, and the same figures as Prometheus gauges
//! (through the `metrics` facade; see `bd3lm_telemetry::metrics`).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{StepStats, ValStats};
use crate::data::write_atomic;
use crate::{Error, Result};

/// The JSON-lines metrics log. Opening it for a resumed run drops the lines written after
/// the saved step, so the log stays one consistent curve.
pub(super) struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    pub(super) fn open(path: &Path, step: u64) -> Result<Self> {
        let kept: String = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v.get("step")?.as_u64())
                        .is_some_and(|s| s <= step)
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(_) => String::new(),
        };
        write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(Error::io(path))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub(super) fn write(&mut self, kind: &str, record: &impl Serialize) -> Result<()> {
        let mut value = serde_json::to_value(record).expect("metrics serialize");
        value["kind"] = kind.into();
        writeln!(self.file, "{value}").map_err(Error::io(&self.path))
    }
}

const STEP: &str = "bd3lm_train_step";
const LOSS: &str = "bd3lm_train_loss";
const TOKENS_PER_SECOND: &str = "bd3lm_train_tokens_per_second";
const TOKENS: &str = "bd3lm_train_tokens_total";
const VALIDATION_NELBO: &str = "bd3lm_validation_nelbo";
const VALIDATION_PERPLEXITY: &str = "bd3lm_validation_perplexity_bound";

/// Describes the trainer's metrics to the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(STEP, "Optimizer steps done");
    describe_gauge!(LOSS, "Training loss (NELBO per token) of the last step");
    describe_gauge!(TOKENS_PER_SECOND, "Tokens per second of the last step");
    describe_counter!(TOKENS, "Tokens trained on, across resumes");
    describe_gauge!(
        VALIDATION_NELBO,
        "NELBO per token on held-out rows (EMA weights) at the last validation"
    );
    describe_gauge!(
        VALIDATION_PERPLEXITY,
        "Perplexity bound on held-out rows at the last validation"
    );
}

pub(super) fn export_step(stats: &StepStats) {
    metrics::gauge!(STEP).set(stats.step as f64);
    metrics::gauge!(LOSS).set(stats.loss);
    metrics::gauge!(TOKENS_PER_SECOND).set(stats.tokens_per_s);
    metrics::counter!(TOKENS).absolute(stats.tokens);
}

pub(super) fn export_validation(val: &ValStats) {
    metrics::gauge!(VALIDATION_NELBO).set(val.nll);
    metrics::gauge!(VALIDATION_PERPLEXITY).set(val.ppl);
}
