//! The resume state of a run: weights, AdamW moments, EMA, step, RNG and data position,
//! written beside the checkpoint and swapped in atomically.

use std::collections::HashMap;
use std::path::Path;

use bd3lm_model::Config;
use bd3lm_model::checkpoint;
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::{RESUME_DIR, TrainOptions, Trainer};
use crate::data::{Loader, Position, Split, write_atomic};
use crate::{Error, Result};

const STATE_FILE: &str = "state.json";
const TENSORS_FILE: &str = "tensors.safetensors";

/// The resume state's JSON part.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    options: TrainOptions,
    config: Config,
    step: u64,
    elapsed_s: f64,
    /// ChaCha word position (a u128, as text).
    rng_word_pos: String,
    data: Position,
    ema_updates: u64,
}

impl Trainer {
    /// Resumes the run in `out` where its last save left it, on the CPU; `steps` extends
    /// or shortens the run.
    pub fn resume(out: &Path, steps: Option<u64>) -> Result<Self> {
        Self::resume_on(out, steps, &[Device::Cpu])
    }

    /// [`Trainer::resume`] with rank `r` on `devices[r]` (one per rank of the run).
    pub fn resume_on(out: &Path, steps: Option<u64>, devices: &[Device]) -> Result<Self> {
        let dir = out.join(RESUME_DIR);
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let bad = |reason: String| Error::Resume {
            path: path.clone(),
            reason,
        };
        let state: State = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let word_pos: u128 = state
            .rng_word_pos
            .parse()
            .map_err(|_| bad("rng_word_pos is not a number".into()))?;
        let mut opts = state.options;
        if let Some(steps) = steps {
            opts.steps = steps;
        }
        opts.check()?;
        let tensors_path = dir.join(TENSORS_FILE);
        let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu).map_err(|e| {
            Error::Resume {
                path: tensors_path.clone(),
                reason: e.to_string(),
            }
        })?;
        let take = |prefix: &str, name: &str| {
            tensors
                .get(&format!("{prefix}.{name}"))
                .cloned()
                .ok_or_else(|| Error::Resume {
                    path: tensors_path.clone(),
                    reason: format!("missing tensor {prefix}.{name}"),
                })
        };
        let mut weights = HashMap::new();
        for (name, _) in checkpoint::tensor_specs(&state.config) {
            weights.insert(name.clone(), take("param", &name)?);
        }
        let train = Loader::open(&opts.data, Split::Train, Some(opts.seed), state.data)?;
        let mut trainer = Self::assemble(out, opts, state.config, &weights, train, devices)?;
        let device = &devices[0];
        for (i, name) in trainer.names.iter().enumerate() {
            trainer.opt.m[i] = take("m", name)?.to_device(device)?;
            trainer.opt.v[i] = take("v", name)?.to_device(device)?;
            trainer.ema.shadow[i] = take("ema", name)?.to_device(device)?;
        }
        trainer.opt.steps = state.step;
        trainer.ema.updates = state.ema_updates;
        trainer.elapsed_s = state.elapsed_s;
        trainer.rng.set_word_pos(word_pos);
        trainer.with_replicas(devices)
    }

    /// Writes the resume state to a fresh directory and swaps it in.
    pub(super) fn save_resume(&self) -> Result<()> {
        let tmp = self.out.join(format!(".{RESUME_DIR}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(Error::io(&tmp))?;
        let mut tensors = HashMap::new();
        for (i, name) in self.names.iter().enumerate() {
            // Rank 0's: every rank holds the same.
            let host = |t: &candle_core::Tensor| t.to_device(&Device::Cpu);
            tensors.insert(format!("param.{name}"), host(self.vars[i].as_tensor())?);
            tensors.insert(format!("m.{name}"), host(&self.opt.m[i])?);
            tensors.insert(format!("v.{name}"), host(&self.opt.v[i])?);
            tensors.insert(format!("ema.{name}"), host(&self.ema.shadow[i])?);
        }
        let path = tmp.join(TENSORS_FILE);
        candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::Resume {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let state = State {
            options: self.opts.clone(),
            config: self.config.clone(),
            step: self.step(),
            elapsed_s: self.elapsed_s,
            rng_word_pos: self.rng.get_word_pos().to_string(),
            data: self.train.position(),
            ema_updates: self.ema.updates,
        };
        let json = serde_json::to_string_pretty(&state).expect("the state serializes");
        write_atomic(&tmp.join(STATE_FILE), json.as_bytes())?;
        // Swap directories so a crash leaves either the old or the new state whole.
        let dir = self.out.join(RESUME_DIR);
        let old = self.out.join(format!(".{RESUME_DIR}.old"));
        let _ = std::fs::remove_dir_all(&old);
        if dir.exists() {
            std::fs::rename(&dir, &old).map_err(Error::io(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(Error::io(&dir))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}
