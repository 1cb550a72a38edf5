//! The block diffusion trainer: the vectorised NELBO, AdamW with warm-up, clipping,
//! accumulation and EMA, validation with the clipped-schedule search, checkpoints in the
//! published layout, and an exact resume state.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bd3lm_config::Recipe;
use bd3lm_diffusion::NoiseSchedule;
use bd3lm_diffusion::loss::{self, NoiseProcess};
use bd3lm_diffusion::schedule::Interval;
use bd3lm_model::checkpoint::{self, Checkpoint};
use bd3lm_model::{Bd3lm, Config};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

mod metrics;
mod parallel;
mod resume;

use metrics::MetricsLog;
pub use metrics::describe as describe_metrics;
use parallel::{Reduce, Replica};

use crate::bound::{self, BlockLoss, ClipGrid};
use crate::data::{Loader, Position, Split, write_atomic};
use crate::optim::{AdamW, AdamWParams, Decay, Ema, LrSchedule, clip_grad_norm};
use crate::{Error, Result};

/// Directory of the exported checkpoint inside a run directory.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// Directory of the resume state inside a run directory.
pub const RESUME_DIR: &str = "resume";
/// The metrics log inside a run directory: one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Everything that shapes a run besides the model; stored in the resume state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Shard directory from data preparation.
    pub data: PathBuf,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub accumulate: usize,
    /// Optimiser steps of the run.
    pub steps: u64,
    /// AdamW hyper-parameters.
    pub adamw: AdamWParams,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// Learning rate after warm-up.
    pub decay: Decay,
    /// Largest global gradient norm.
    pub clip: f64,
    /// EMA decay of the exported weights.
    pub ema: f64,
    /// Seed of the initial weights, the data order and the noise.
    pub seed: u64,
    /// Steps between validations (0: only at the end).
    pub val_every: u64,
    /// Held-out batches per validation.
    pub val_batches: usize,
    /// Steps between checkpoints (0: only at the end).
    pub save_every: u64,
    /// Search the clipped noise interval at each validation and train with it.
    pub clip_search: bool,
    /// Masking schedule.
    pub schedule: NoiseSchedule,
    /// Dtype of the exported checkpoint's weights (f32, f16 or bf16).
    pub save_dtype: String,
    /// Ranks of data-parallel training: each takes `batch_size` rows of every
    /// micro-batch on its own device.
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

impl TrainOptions {
    /// The paper's optimiser settings on `data`, with a short run's intervals.
    pub fn new(data: PathBuf) -> Self {
        Self::from_recipe(data, &Recipe::default())
    }

    /// `recipe` on `data`, with the log-linear schedule and f32 exports.
    pub fn from_recipe(data: PathBuf, recipe: &Recipe) -> Self {
        Self {
            data,
            batch_size: recipe.batch_size,
            accumulate: recipe.accumulate,
            steps: recipe.steps,
            adamw: AdamWParams {
                lr: recipe.lr,
                ..AdamWParams::default()
            },
            warmup: recipe.warmup,
            decay: recipe.decay,
            clip: recipe.grad_clip,
            ema: recipe.ema,
            seed: recipe.seed,
            val_every: recipe.val_every,
            val_batches: recipe.val_batches,
            save_every: recipe.save_every,
            clip_search: recipe.clip_search,
            schedule: NoiseSchedule::LogLinear,
            save_dtype: "f32".into(),
            world_size: recipe.world_size as usize,
        }
    }

    fn check(&self) -> Result<()> {
        let positive = |name, v: u64| {
            if v == 0 {
                Err(Error::Param {
                    name,
                    reason: "must be positive".into(),
                })
            } else {
                Ok(())
            }
        };
        positive("batch_size", self.batch_size as u64)?;
        positive("accumulate", self.accumulate as u64)?;
        positive("steps", self.steps)?;
        positive("val_batches", self.val_batches as u64)?;
        positive("world_size", self.world_size as u64)?;
        if !(self.adamw.lr > 0.0 && self.clip > 0.0 && (0.0..1.0).contains(&self.ema)) {
            return Err(Error::Param {
                name: "lr/clip/ema",
                reason: "lr and clip must be positive and ema in [0, 1)".into(),
            });
        }
        self.save_dtype()?;
        Ok(())
    }

    fn save_dtype(&self) -> Result<DType> {
        match self.save_dtype.parse::<DType>() {
            Ok(d @ (DType::F32 | DType::F16 | DType::BF16)) => Ok(d),
            _ => Err(Error::Param {
                name: "save_dtype",
                reason: format!("expected f32, f16 or bf16, found {:?}", self.save_dtype),
            }),
        }
    }
}

/// Where the weights of a new run come from.
#[derive(Debug, Clone)]
pub enum Init {
    /// The reference's initialisation of a new network.
    Scratch(Config),
    /// A checkpoint's weights (its EMA), optionally with another block size: the paper
    /// fine-tunes an `L' = n` model to `L' = 4`.
    Checkpoint {
        /// Checkpoint directory.
        dir: PathBuf,
        /// New block size.
        block_size: Option<usize>,
    },
}

/// Figures of one optimiser step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepStats {
    /// Steps done, this one included.
    pub step: u64,
    /// Training loss (mean over the step's micro-batches).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Tokens per second of this step.
    pub tokens_per_s: f64,
    /// Training seconds so far, across resumes.
    pub elapsed_s: f64,
}

/// Figures of one validation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ValStats {
    /// Steps done.
    pub step: u64,
    /// NELBO per token on held-out rows (EMA weights).
    pub nll: f64,
    /// Its perplexity bound.
    pub ppl: f64,
    /// Held-out tokens.
    pub tokens: usize,
    /// The clipped interval training uses from now on.
    pub eps_min: f64,
    /// Upper end.
    pub eps_max: f64,
}

/// What a run reports while it goes.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// An optimiser step finished.
    Step(&'a StepStats),
    /// A validation finished.
    Validation(&'a ValStats),
    /// A checkpoint and resume state were written.
    Saved(&'a Path),
}

/// A training run in a run directory.
pub struct Trainer {
    out: PathBuf,
    opts: TrainOptions,
    config: Config,
    names: Vec<String>,
    vars: Vec<Var>,
    model: Bd3lm,
    opt: AdamW,
    ema: Ema,
    process: NoiseProcess,
    rng: ChaCha8Rng,
    train: Loader,
    elapsed_s: f64,
    /// Ranks 1.. of a data-parallel run (rank 0 is the fields above).
    replicas: Vec<Replica>,
    reduce: Reduce,
}

impl Trainer {
    /// A new run in `out` from `init`, on the CPU.
    pub fn new(out: &Path, opts: TrainOptions, init: Init) -> Result<Self> {
        Self::new_on(out, opts, init, &[Device::Cpu])
    }

    /// A new run in `out` from `init`, rank `r` on `devices[r]` (one device per rank of
    /// `opts.world_size`).
    pub fn new_on(out: &Path, opts: TrainOptions, init: Init, devices: &[Device]) -> Result<Self> {
        opts.check()?;
        let (config, weights) = match init {
            Init::Scratch(config) => {
                let w = checkpoint::init_weights(&config, opts.seed)?;
                (config, w)
            }
            Init::Checkpoint { dir, block_size } => {
                let ckpt = Checkpoint::open(&dir)?;
                let mut config = ckpt.config.clone();
                if let Some(bs) = block_size {
                    config.block_size = bs;
                    config.sampling_eps_min = 1e-3;
                    config.sampling_eps_max = 1.0;
                }
                (config, ckpt.weights()?)
            }
        };
        config.validate()?;
        let train = Loader::open(
            &opts.data,
            Split::Train,
            Some(opts.seed),
            Position::default(),
        )?;
        Self::assemble(out, opts, config, &weights, train, devices)?.with_replicas(devices)
    }

    /// The parts common to a new and a resumed run.
    fn assemble(
        out: &Path,
        opts: TrainOptions,
        config: Config,
        weights: &HashMap<String, Tensor>,
        train: Loader,
        devices: &[Device],
    ) -> Result<Self> {
        check_data(&config, &train, &opts.data)?;
        if devices.len() != opts.world_size {
            return Err(Error::Param {
                name: "world_size",
                reason: format!(
                    "the run has {} ranks, {} devices were given",
                    opts.world_size,
                    devices.len()
                ),
            });
        }
        let device = &devices[0];
        let mut names = Vec::new();
        let mut vars = Vec::new();
        for (name, _) in checkpoint::tensor_specs(&config) {
            let w = weights[&name].to_device(device)?.to_dtype(DType::F32)?;
            vars.push(Var::from_tensor(&w)?);
            names.push(name);
        }
        let tensors = vars.iter().map(|v| v.as_tensor().clone());
        let model = build(&config, &names, tensors, device)?;
        let rng = ChaCha8Rng::seed_from_u64(opts.seed);
        let opt = AdamW::new(&vars, opts.adamw)?;
        let ema = Ema::new(&vars, opts.ema)?;
        let mut process = NoiseProcess::new(config.block_size, config.mask_id());
        process.schedule = opts.schedule;
        process.interval = Interval::new(config.sampling_eps_min, config.sampling_eps_max)?;
        std::fs::create_dir_all(out).map_err(Error::io(out))?;
        Ok(Self {
            out: out.to_path_buf(),
            opts,
            config,
            names,
            vars,
            model,
            opt,
            ema,
            process,
            rng,
            train,
            elapsed_s: 0.0,
            replicas: Vec::new(),
            reduce: Reduce::for_devices(devices)?,
        })
    }

    /// Ranks 1.. on `devices[1..]`, copies of rank 0 as it is now.
    fn with_replicas(mut self, devices: &[Device]) -> Result<Self> {
        self.replicas = devices[1..]
            .iter()
            .map(|d| self.replica(d))
            .collect::<Result<_>>()?;
        Ok(self)
    }

    /// A copy of rank 0's weights and optimiser state on `device`.
    fn replica(&self, device: &Device) -> Result<Replica> {
        let vars = self
            .vars
            .iter()
            .map(|v| Ok(Var::from_tensor(&v.as_tensor().to_device(device)?)?))
            .collect::<Result<Vec<_>>>()?;
        let tensors = vars.iter().map(|v| v.as_tensor().clone());
        let model = build(&self.config, &self.names, tensors, device)?;
        let mut opt = AdamW::new(&vars, self.opts.adamw)?;
        opt.steps = self.opt.steps;
        for i in 0..vars.len() {
            opt.m[i] = self.opt.m[i].to_device(device)?;
            opt.v[i] = self.opt.v[i].to_device(device)?;
        }
        Ok(Replica { vars, model, opt })
    }

    /// Ranks of the run.
    pub fn world(&self) -> usize {
        1 + self.replicas.len()
    }

    /// Optimiser steps done.
    pub fn step(&self) -> u64 {
        self.opt.steps
    }

    /// The run's options.
    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }

    /// The model's config, with the clipped interval found so far.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Trainable parameters.
    pub fn parameters(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Tokens per optimiser step, all ranks together.
    pub fn tokens_per_step(&self) -> u64 {
        let rows = self.opts.batch_size * self.opts.accumulate * self.world();
        (rows * self.config.model_length) as u64
    }

    /// One optimiser step: forward and backward over `accumulate` micro-batches (each
    /// shared out between the ranks), the gradients averaged over ranks, clipping, AdamW
    /// on every rank and the EMA update.
    pub fn train_step(&mut self) -> Result<StepStats> {
        let started = Instant::now();
        let (b, n, world) = (self.opts.batch_size, self.config.model_length, self.world());
        let mut grads: Vec<Vec<Tensor>> = vec![Vec::new(); world];
        let mut loss_sum = 0.0;
        for _ in 0..self.opts.accumulate {
            let ids = self.train.next_batch(b * world)?;
            let noised = self.process.corrupt(&ids, b * world, n, &mut self.rng)?;
            for (rank, grads) in grads.iter_mut().enumerate() {
                let (ids, noised) = parallel::share(&ids, &noised, (rank, world), n);
                let (model, vars) = match rank {
                    0 => (&self.model, &self.vars),
                    r => (&self.replicas[r - 1].model, &self.replicas[r - 1].vars),
                };
                let part = Part {
                    model,
                    vars,
                    ids,
                    noised: &noised,
                };
                loss_sum += part.backward(&self.process, self.opts.accumulate, grads)?;
            }
        }
        self.reduce.mean(&mut grads)?;
        // The same averaged gradients on every rank: the same clipping.
        let norms = grads
            .iter_mut()
            .map(|g| clip_grad_norm(g, self.opts.clip))
            .collect::<Result<Vec<_>>>()?;
        let grad_norm = norms[0];
        let schedule = LrSchedule {
            peak: self.opts.adamw.lr,
            warmup: self.opts.warmup,
            decay: self.opts.decay,
            total: self.opts.steps,
        };
        let lr = schedule.at(self.step());
        for (replica, grads) in self.replicas.iter_mut().zip(&grads[1..]) {
            replica.opt.step(&replica.vars, grads, lr)?;
        }
        self.opt.step(&self.vars, &grads[0], lr)?;
        self.ema.update(&self.vars)?;
        let seconds = started.elapsed().as_secs_f64();
        self.elapsed_s += seconds;
        Ok(StepStats {
            step: self.step(),
            loss: loss_sum / (self.opts.accumulate * world) as f64,
            grad_norm,
            lr,
            tokens: self.step() * self.tokens_per_step(),
            tokens_per_s: self.tokens_per_step() as f64 / seconds,
            elapsed_s: self.elapsed_s,
        })
    }

    /// The network with the EMA weights: the one evaluated and exported.
    pub fn ema_model(&self) -> Result<Bd3lm> {
        let device = self.vars[0].device().clone();
        build(
            &self.config,
            &self.names,
            self.ema.shadow.iter().cloned(),
            &device,
        )
    }

    /// The perplexity bound of the EMA weights on held-out rows; with the clipped-schedule
    /// search on (and `L' > 1`), training continues on the interval of least variance.
    pub fn validate(&mut self) -> Result<ValStats> {
        let model = self.ema_model()?;
        let search = self.opts.clip_search && self.config.block_size > 1;
        let mut blocks: Vec<BlockLoss> = Vec::new();
        // The same held-out noise at every validation, so the figures are comparable.
        let seed = self.opts.seed ^ 0x5eed_0f1d;
        let bound = bound::perplexity_bound(
            &model,
            &self.opts.data,
            Some(self.opts.val_batches),
            self.opts.batch_size,
            seed,
            search.then_some(&mut blocks),
        )?;
        if let Some((interval, _)) = search
            .then(|| bound::clipped_interval(&blocks, &ClipGrid::default()))
            .flatten()
        {
            self.process.interval = interval;
            self.config.sampling_eps_min = interval.min;
            self.config.sampling_eps_max = interval.max;
        }
        Ok(ValStats {
            step: self.step(),
            nll: bound.nll,
            ppl: bound.ppl,
            tokens: bound.tokens,
            eps_min: self.config.sampling_eps_min,
            eps_max: self.config.sampling_eps_max,
        })
    }

    /// Writes the checkpoint (EMA weights, published layout, with the data's tokenizer)
    /// and then the resume state, each atomically. Returns the checkpoint directory.
    pub fn save(&self) -> Result<PathBuf> {
        let ckpt = self.out.join(CHECKPOINT_DIR);
        let ema: HashMap<String, Tensor> = self
            .names
            .iter()
            .cloned()
            .zip(self.ema.shadow.iter().cloned())
            .map(|(name, t)| Ok((name, t.to_device(&Device::Cpu)?)))
            .collect::<Result<_>>()?;
        checkpoint::save(&ckpt, &self.config, &ema, self.opts.save_dtype()?)?;
        let tokenizer = self.opts.data.join("tokenizer.json");
        if tokenizer.is_file() {
            let bytes = std::fs::read(&tokenizer).map_err(Error::io(&tokenizer))?;
            write_atomic(&ckpt.join("tokenizer.json"), &bytes)?;
        }
        self.save_resume()?;
        Ok(ckpt)
    }

    /// Trains to the last step, validating and saving at the configured intervals and at
    /// the end, appending every event to the metrics log and reporting it to `on_event`.
    pub fn run(&mut self, mut on_event: impl FnMut(Event)) -> Result<()> {
        self.run_until(|event| {
            on_event(event);
            ControlFlow::Continue(())
        })?;
        Ok(())
    }

    /// [`Trainer::run`], asking `on_event` after each event whether to go on. A `Break`
    /// stops the run at once: after a step, before that step is logged, validated or
    /// saved, so the run directory stays as its last save left it and a resume continues
    /// the same curve. Returns whether the run reached its last step.
    pub fn run_until(
        &mut self,
        mut on_event: impl FnMut(Event) -> ControlFlow<()>,
    ) -> Result<bool> {
        let mut log = MetricsLog::open(&self.out.join(METRICS_FILE), self.step())?;
        let due = |every: u64, step: u64| every > 0 && step.is_multiple_of(every);
        while self.step() < self.opts.steps {
            let stats = self.train_step()?;
            if on_event(Event::Step(&stats)).is_break() {
                return Ok(false);
            }
            log.write("train", &stats)?;
            metrics::export_step(&stats);
            let step = self.step();
            let last = step == self.opts.steps;
            if last || due(self.opts.val_every, step) {
                let val = self.validate()?;
                log.write("validation", &val)?;
                metrics::export_validation(&val);
                if on_event(Event::Validation(&val)).is_break() {
                    return Ok(false);
                }
            }
            if last || due(self.opts.save_every, step) {
                let dir = self.save()?;
                if on_event(Event::Saved(&dir)).is_break() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// One rank's share of a micro-batch: its network, weights, token ids and noise.
struct Part<'a> {
    model: &'a Bd3lm,
    vars: &'a [Var],
    ids: Vec<u32>,
    noised: &'a bd3lm_diffusion::loss::Noised,
}

impl Part<'_> {
    /// Forward and backward of the share, its gradients (scaled for `accumulate`
    /// micro-batches) added to `grads`; returns its loss.
    fn backward(
        self,
        process: &NoiseProcess,
        accumulate: usize,
        grads: &mut Vec<Tensor>,
    ) -> Result<f64> {
        let device = self.model.device();
        let n = self.noised.xt.len() / self.noised.sigma.len();
        let b = self.noised.sigma.len();
        let ones = Tensor::ones((b, n), DType::F32, device)?;
        let x0 = Tensor::from_vec(self.ids, (b, n), device)?;
        let out = loss::nelbo(self.model, &x0, self.noised, process.schedule, &ones)?;
        let value = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let store = (out.loss / accumulate as f64)?.backward()?;
        for (i, var) in self.vars.iter().enumerate() {
            let g = match store.get(var.as_tensor()) {
                Some(g) => g.detach(),
                None => var.zeros_like()?,
            };
            if grads.len() <= i {
                grads.push(g);
            } else {
                grads[i] = (&grads[i] + g)?;
            }
        }
        Ok(value)
    }
}

/// The network of `config` over `tensors` (in the order of `names`) on `device`.
fn build(
    config: &Config,
    names: &[String],
    tensors: impl Iterator<Item = Tensor>,
    device: &Device,
) -> Result<Bd3lm> {
    let map: HashMap<String, Tensor> = names.iter().cloned().zip(tensors).collect();
    Ok(checkpoint::from_weights(config, map, DType::F32, device)?)
}

/// Checks that the shards fit the model: row length, vocabulary and block size.
fn check_data(config: &Config, loader: &Loader, data: &Path) -> Result<()> {
    let index = loader.index();
    let bad = |reason: String| Error::Shard {
        path: data.join(crate::data::INDEX_FILE),
        reason,
    };
    if index.row_length != config.model_length {
        return Err(bad(format!(
            "rows of {} tokens, the model's length is {}",
            index.row_length, config.model_length
        )));
    }
    // `Config::validate` already keeps the model's mask inside its vocabulary.
    if index.vocab_size > config.vocab_size {
        return Err(bad(format!(
            "ids below {}, the model's vocabulary is {}",
            index.vocab_size, config.vocab_size
        )));
    }
    if index.mask_id != config.mask_id() {
        return Err(bad(format!(
            "mask id {}, the model's is {}",
            index.mask_id,
            config.mask_id()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{counting_docs, shards, word_config};

    fn tiny() -> Config {
        word_config(16, 4)
    }

    fn options(data: &Path, steps: u64) -> TrainOptions {
        let mut opts = TrainOptions::new(data.to_path_buf());
        opts.batch_size = 4;
        opts.steps = steps;
        opts.adamw.lr = 3e-3;
        opts.warmup = 5;
        opts.ema = 0.9;
        opts.val_batches = 2;
        opts
    }

    fn losses(run: &Path) -> Vec<f64> {
        std::fs::read_to_string(run.join(METRICS_FILE))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "train")
            .map(|v| v["loss"].as_f64().unwrap())
            .collect()
    }

    /// The held-out NELBO (fixed noise) falls well below that of the initial weights, and
    /// the training loss falls with it.
    #[test]
    fn loss_decreases_on_a_tiny_corpus() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(20, 60), 16, 5);
        let run = dir.path().join("run");
        let mut opts = options(&data, 50);
        opts.batch_size = 16;
        let mut trainer = Trainer::new(&run, opts, Init::Scratch(tiny())).unwrap();
        let before = trainer.validate().unwrap();
        let mut after = None;
        trainer
            .run(|e| {
                if let Event::Validation(v) = e {
                    after = Some(*v);
                }
            })
            .unwrap();
        let after = after.unwrap();
        assert!(after.nll < 0.7 * before.nll, "{before:?} -> {after:?}");
        let l = losses(&run);
        let (first, last) = (l[..10].iter().sum::<f64>(), l[40..].iter().sum::<f64>());
        assert!(
            last < 0.8 * first,
            "first ten {first}, last ten {last}: {l:?}"
        );
    }

    /// The Prometheus gauges show the metrics log's last step and validation.
    #[test]
    fn the_gauges_follow_the_metrics_log() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
        let mut opts = options(&data, 3);
        opts.val_every = 3;
        let run = dir.path().join("run");
        let recorder = bd3lm_telemetry::metrics::recorder();
        let handle = recorder.handle();
        let mut last = None;
        ::metrics::with_local_recorder(&recorder, || {
            let mut trainer = Trainer::new(&run, opts, Init::Scratch(tiny())).unwrap();
            trainer
                .run(|e| {
                    if let Event::Step(s) = e {
                        last = Some(*s);
                    }
                })
                .unwrap();
        });
        let (text, last) = (handle.render(), last.unwrap());
        let gauge = |name: &str| {
            let value = bd3lm_telemetry::metrics::sample(&text, name);
            value.unwrap_or_else(|| panic!("{name} missing: {text}"))
        };
        assert_eq!(gauge("bd3lm_train_step"), 3.0);
        assert_eq!(gauge("bd3lm_train_loss"), last.loss);
        assert_eq!(gauge("bd3lm_train_tokens_total"), last.tokens as f64);
        assert!(gauge("bd3lm_validation_nelbo") > 0.0);
    }

    /// Three steps, a save, a resume and three more steps give the losses and weights of six
    /// uninterrupted steps, bit for bit.
    #[test]
    fn a_resumed_run_continues_the_same_curve() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
        let mut opts = options(&data, 6);
        opts.val_every = 3;
        opts.save_every = 3;
        let whole = dir.path().join("whole");
        Trainer::new(&whole, opts.clone(), Init::Scratch(tiny()))
            .unwrap()
            .run(|_| {})
            .unwrap();
        let split = dir.path().join("split");
        opts.steps = 3;
        Trainer::new(&split, opts, Init::Scratch(tiny()))
            .unwrap()
            .run(|_| {})
            .unwrap();
        let mut resumed = Trainer::resume(&split, Some(6)).unwrap();
        assert_eq!(resumed.step(), 3);
        resumed.run(|_| {}).unwrap();
        assert_eq!(losses(&whole), losses(&split));
        let a = Checkpoint::open(whole.join(CHECKPOINT_DIR)).unwrap();
        let b = Checkpoint::open(split.join(CHECKPOINT_DIR)).unwrap();
        assert_eq!(a.config, b.config);
        let (a, b) = (a.weights().unwrap(), b.weights().unwrap());
        for (name, t) in &a {
            let (x, y) = (t.flatten_all().unwrap(), b[name].flatten_all().unwrap());
            assert_eq!(
                x.to_vec1::<f32>().unwrap(),
                y.to_vec1::<f32>().unwrap(),
                "{name}"
            );
        }
    }

    /// Two ranks of 4 rows take the step one rank of 8 rows takes (the same rows and
    /// noise, the gradients averaged: the same loss and gradient up to summation order;
    /// later steps drift apart as AdamW amplifies the rounding of near-zero gradients),
    /// their replicas stay identical, and a data-parallel run resumes on its own curve
    /// bit for bit.
    #[test]
    fn data_parallel_ranks_match_one_rank_and_resume_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
        let mut single = options(&data, 6);
        single.batch_size = 8;
        single.save_every = 3;
        let mut split = single.clone();
        (split.batch_size, split.world_size) = (4, 2);
        let cpus = [Device::Cpu, Device::Cpu];
        let start = |opts: &TrainOptions, name: &str, devices: &[Device]| {
            let out = dir.path().join(name);
            Trainer::new_on(&out, opts.clone(), Init::Scratch(tiny()), devices).unwrap()
        };
        let one = start(&single, "one", &[Device::Cpu]).train_step().unwrap();
        let mut trainer = start(&split, "two", &cpus);
        let two = trainer.train_step().unwrap();
        assert_eq!(trainer.world(), 2);
        assert_eq!(trainer.tokens_per_step(), 8 * 16);
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * a.abs();
        assert!(
            close(one.loss, two.loss) && close(one.grad_norm, two.grad_norm),
            "{one:?} vs {two:?}"
        );

        trainer.run(|_| {}).unwrap();
        for (v, r) in trainer.vars.iter().zip(&trainer.replicas[0].vars) {
            let (x, y) = (v.flatten_all().unwrap(), r.flatten_all().unwrap());
            assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
        }
        start(&split, "whole", &cpus).run(|_| {}).unwrap();
        let mut half = split.clone();
        half.steps = 3;
        start(&half, "resumed", &cpus).run(|_| {}).unwrap();
        let out = dir.path().join("resumed");
        let mut resumed = Trainer::resume_on(&out, Some(6), &cpus).unwrap();
        resumed.run(|_| {}).unwrap();
        assert_eq!(losses(&out), losses(&dir.path().join("whole")));
        let one_device = Trainer::resume_on(&out, Some(7), &[Device::Cpu]);
        assert!(one_device.is_err(), "a two-rank run on one device");
    }

    /// The exported checkpoint holds the EMA weights bit for bit, the clipped interval, and
    /// the data's tokenizer; fine-tuning from it to another block size starts from them.
    #[test]
    fn checkpoints_round_trip_and_fine_tune_to_another_block_size() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
        let run = dir.path().join("run");
        let mut trainer = Trainer::new(&run, options(&data, 2), Init::Scratch(tiny())).unwrap();
        trainer.run(|_| {}).unwrap();
        let ckpt = Checkpoint::open(run.join(CHECKPOINT_DIR)).unwrap();
        assert_eq!(&ckpt.config, trainer.config());
        assert!(run.join(CHECKPOINT_DIR).join("tokenizer.json").is_file());
        let stored = ckpt.weights().unwrap();
        for (name, t) in trainer.names.iter().zip(&trainer.ema.shadow) {
            let (x, y) = (
                t.flatten_all().unwrap(),
                stored[name].flatten_all().unwrap(),
            );
            assert_eq!(
                x.to_vec1::<f32>().unwrap(),
                y.to_vec1::<f32>().unwrap(),
                "{name}"
            );
        }
        let init = Init::Checkpoint {
            dir: run.join(CHECKPOINT_DIR),
            block_size: Some(1),
        };
        let mut ar = Trainer::new(&dir.path().join("ar"), options(&data, 2), init).unwrap();
        assert_eq!(ar.config().block_size, 1);
        let first = ar.vars[3].as_tensor().flatten_all().unwrap();
        let from = stored[&ar.names[3]].flatten_all().unwrap();
        assert_eq!(
            first.to_vec1::<f32>().unwrap(),
            from.to_vec1::<f32>().unwrap()
        );
        let stats = ar.train_step().unwrap();
        assert!(stats.loss.is_finite() && stats.loss > 0.0);
        assert!(
            Trainer::new(
                &dir.path().join("x"),
                options(&data, 2),
                Init::Scratch(word_config(32, 4))
            )
            .is_err()
        );
    }

    /// Data prepared for another mask id is refused: its rows may hold the model's mask.
    #[test]
    fn data_of_another_mask_id_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (data, _) = shards(dir.path(), &counting_docs(12, 50), 16, 4);
        let err = Trainer::new(
            &dir.path().join("run"),
            options(&data, 1),
            Init::Scratch(Config {
                vocab_size: 13,
                ..word_config(16, 4)
            }),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("mask id 11, the model's is 12"), "{err}");
    }
}
