//! `bd3lm check-reference`: recompute every output stored in a reference fixture file and
//! compare it with the authors' PyTorch values.
//!
//! A fixture file is a safetensors file with the layout of `tests/data/reference-bd3lm-bs4`
//! (see its FIXTURES.md). Outputs whose key is absent, or whose inputs are absent, are
//! listed as skipped.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, bail};
use bd3lm_diffusion::{NoiseSchedule, loss, subs};
use bd3lm_model::{Bd3lm, Config, checkpoint::Checkpoint, mask};
use bd3lm_worker::Precision;
use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Serialize;

/// The outcome of one output key.
#[derive(Debug, Serialize)]
pub struct KeyReport {
    /// Largest absolute difference between ours and the reference.
    pub max_abs_diff: f64,
    /// Whether it is within the tolerance.
    pub pass: bool,
}

/// The whole conformance report, printed as one JSON object.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Checkpoint directory.
    pub checkpoint: String,
    /// Fixture file.
    pub fixtures: String,
    /// Tolerance on the max abs difference.
    pub tolerance: f64,
    /// Result per compared output.
    pub keys: BTreeMap<String, KeyReport>,
    /// Outputs not compared, with the reason.
    pub skipped: BTreeMap<String, String>,
    /// True when every compared output passed and at least one was compared.
    pub pass: bool,
}

/// Every output a fixture file may hold, in the order they are computed.
const OUTPUTS: [&str; 15] = [
    "block_mask",
    "cond_c",
    "train_logits",
    "train_hidden",
    "subs_logprobs",
    "nelbo_loss",
    "nelbo_attention_mask",
    "nelbo_nlls",
    "nelbo_token_nll",
    "cached_logits",
    "cached_store_logits",
    "cache_idx_before",
    "uncached_logits",
    "uncached_store_logits",
    "uncached_window_start",
];

/// Runs the check of `fixtures` against the checkpoint in `checkpoint_dir`.
/// The model runs on `device` in `precision` (its KV caches too, which the cached outputs
/// go through); the differences are taken in f64 on the host.
pub fn run(
    checkpoint_dir: &Path,
    fixtures: &Path,
    tolerance: f64,
    device: &Device,
    precision: Precision,
) -> anyhow::Result<Report> {
    let model = precision.load_model(Checkpoint::open(checkpoint_dir)?, device)?;
    let stored = candle_core::safetensors::load(fixtures, device).with_context(|| {
        format!(
            "{}: not a readable safetensors fixture file",
            fixtures.display()
        )
    })?;
    let ours = compute(&model, &stored)?;
    let mut report = Report {
        checkpoint: checkpoint_dir.display().to_string(),
        fixtures: fixtures.display().to_string(),
        tolerance,
        keys: BTreeMap::new(),
        skipped: BTreeMap::new(),
        pass: false,
    };
    for key in OUTPUTS {
        match (stored.get(key), ours.get(key)) {
            (None, _) => {
                report
                    .skipped
                    .insert(key.into(), "absent from the fixture file".into());
            }
            (Some(_), None) => {
                report
                    .skipped
                    .insert(key.into(), "inputs absent from the fixture file".into());
            }
            (Some(_), Some(Computed::Skip(reason))) => {
                report.skipped.insert(key.into(), reason.clone());
            }
            (Some(reference), Some(Computed::Value(ours))) => {
                let diff = max_abs_diff(key, ours, reference)?;
                report.keys.insert(
                    key.into(),
                    KeyReport {
                        max_abs_diff: diff,
                        pass: diff <= tolerance,
                    },
                );
            }
        }
    }
    report.pass = !report.keys.is_empty() && report.keys.values().all(|k| k.pass);
    Ok(report)
}

enum Computed {
    Value(Tensor),
    Skip(String),
}

fn max_abs_diff(key: &str, ours: &Tensor, reference: &Tensor) -> anyhow::Result<f64> {
    let reference = reference.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let ours = ours.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    if ours.elem_count() != reference.elem_count() {
        bail!(
            "{key}: computed {:?} values, the fixture holds {:?}",
            ours.dims(),
            reference.dims()
        );
    }
    let ours = ours.reshape(reference.shape())?;
    Ok((ours - reference)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?)
}

/// Integer ids of fixture key `name` as u32, checked to fit.
fn ids(stored: &HashMap<String, Tensor>, name: &str) -> anyhow::Result<Option<Tensor>> {
    let Some(t) = stored.get(name) else {
        return Ok(None);
    };
    let t = t.to_dtype(DType::I64)?;
    let (min, max) = (
        t.flatten_all()?.min(0)?.to_scalar::<i64>()?,
        t.flatten_all()?.max(0)?.to_scalar::<i64>()?,
    );
    if min < 0 || max > u32::MAX as i64 {
        bail!("fixture key {name}: token ids must be in 0..2^32, found {min}..={max}");
    }
    Ok(Some(t.to_dtype(DType::U32)?))
}

/// Sigma for a batch: the fixture's value when present, else zeros.
fn sigma_or_zeros(sigma: Option<&Tensor>, batch: usize, dev: &Device) -> anyhow::Result<Tensor> {
    Ok(match sigma {
        Some(s) => s.to_dtype(DType::F32)?,
        None => Tensor::zeros(batch, DType::F32, dev)?,
    })
}

fn compute(
    model: &Bd3lm,
    stored: &HashMap<String, Tensor>,
) -> anyhow::Result<HashMap<&'static str, Computed>> {
    let cfg = model.config();
    let mut out = HashMap::new();
    let x0 = ids(stored, "x0")?;
    let xt = ids(stored, "xt")?;
    let train_input = match (ids(stored, "train_input")?, &xt, &x0) {
        (Some(t), _, _) => Some(t),
        (None, Some(xt), Some(x0)) => Some(Tensor::cat(&[xt, x0], 1)?),
        _ => None,
    };
    if let Some(reference) = stored.get("block_mask") {
        let n = reference.dim(0)? / 2;
        let allowed: Vec<f32> = (0..4 * n * n)
            .map(|ij| {
                mask::train_allows(ij / (2 * n), ij % (2 * n), n, cfg.block_size) as u8 as f32
            })
            .collect();
        out.insert(
            "block_mask",
            Computed::Value(Tensor::from_vec(allowed, (2 * n, 2 * n), model.device())?),
        );
    }
    if let Some(input) = &train_input {
        let b = input.dim(0)?;
        let sigma = sigma_or_zeros(stored.get("train_sigma"), b, model.device())?;
        out.insert(
            "cond_c",
            match model.cond(&sigma)? {
                Some(c) => Computed::Value(c),
                None => Computed::Skip("the model has no adaLN conditioning".into()),
            },
        );
        let (logits, hidden) = model.forward_train_hidden(input, &sigma)?;
        out.insert("train_hidden", Computed::Value(Tensor::stack(&hidden, 0)?));
        if let Some(xt) = &xt {
            let log_probs = subs::log_probs(&logits, xt, cfg.mask_id())?;
            if let (Some(x0), Some(t)) = (&x0, stored.get("t")) {
                let token_loss = loss::token_loss(&log_probs, x0, t, NoiseSchedule::LogLinear)?;
                let (b, n) = token_loss.dims2()?;
                let eval_mask = loss::eval_mask(b, n, model.device())?;
                let nlls = (&token_loss * &eval_mask)?;
                let mean = loss::mean_over(&token_loss, &eval_mask)?;
                out.insert(
                    "nelbo_token_nll",
                    Computed::Value(Tensor::new(&[mean as f32], model.device())?),
                );
                out.insert("nelbo_nlls", Computed::Value(nlls));
                out.insert("nelbo_attention_mask", Computed::Value(eval_mask));
                out.insert("nelbo_loss", Computed::Value(token_loss));
            }
            out.insert("subs_logprobs", Computed::Value(log_probs));
        }
        out.insert("train_logits", Computed::Value(logits));
    }
    if let (Some(seq), Some(partial)) = (ids(stored, "seq")?, ids(stored, "seq_partial")?) {
        sampling_outputs(
            model,
            cfg,
            &seq,
            &partial,
            stored.get("seq_sigma"),
            &mut out,
        )?;
    }
    Ok(out)
}

/// Cached and uncached sampling passes over every block of `seq`.
fn sampling_outputs(
    model: &Bd3lm,
    cfg: &Config,
    seq: &Tensor,
    partial: &Tensor,
    seq_sigma: Option<&Tensor>,
    out: &mut HashMap<&'static str, Computed>,
) -> anyhow::Result<()> {
    let (k_blocks, b, bs) = partial.dims3()?;
    if bs != cfg.block_size || seq.dim(1)? < k_blocks * bs {
        bail!(
            "fixture seq_partial has blocks of {bs} and seq {} tokens; the checkpoint's block_size is {}",
            seq.dim(1)?,
            cfg.block_size
        );
    }
    let mut cache = model.new_cache(b)?;
    let (mut cached, mut cached_store, mut idx_before) = (Vec::new(), Vec::new(), Vec::new());
    let (mut uncached, mut uncached_store, mut window_start) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..k_blocks {
        let sigma = sigma_or_zeros(
            seq_sigma.map(|s| s.i(k)).transpose()?.as_ref(),
            b,
            model.device(),
        )?;
        let noisy = partial.i(k)?;
        let clean = seq.narrow(1, k * bs, bs)?;
        idx_before.push(cache.len() as f32);
        cached.push(model.denoise(&noisy, &sigma, &mut cache)?);
        cached_store.push(model.denoise(&clean, &sigma, &mut cache)?);
        model.commit(&clean, &sigma, &mut cache)?;

        let start = ((k + 1) * bs).saturating_sub(cfg.model_length);
        window_start.push(start as f32);
        let prefix = seq.narrow(1, start, k * bs - start)?;
        let window = |block: &Tensor| -> anyhow::Result<Tensor> {
            let tokens = Tensor::cat(&[&prefix, block], 1)?;
            let logits = model.forward_block_causal(&tokens, &sigma)?;
            Ok(logits.narrow(1, k * bs - start, bs)?)
        };
        uncached.push(window(&noisy)?);
        uncached_store.push(window(&clean)?);
    }
    out.insert("cached_logits", Computed::Value(Tensor::stack(&cached, 0)?));
    out.insert(
        "cached_store_logits",
        Computed::Value(Tensor::stack(&cached_store, 0)?),
    );
    out.insert(
        "cache_idx_before",
        Computed::Value(Tensor::new(idx_before, model.device())?),
    );
    out.insert(
        "uncached_logits",
        Computed::Value(Tensor::stack(&uncached, 0)?),
    );
    out.insert(
        "uncached_store_logits",
        Computed::Value(Tensor::stack(&uncached_store, 0)?),
    );
    out.insert(
        "uncached_window_start",
        Computed::Value(Tensor::new(window_start, model.device())?),
    );
    Ok(())
}
