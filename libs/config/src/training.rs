//! Training settings that `bd3lm train`, the job specification and the trainer share.

use serde::{Deserialize, Serialize};

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Stay at the peak (the paper).
    Constant,
    /// Cosine down to a tenth of the peak at the last step.
    Cosine,
}

/// A training run's recipe: its batches, optimiser, schedule, validation and saves. `bd3lm
/// train` builds one from its flags and a training job carries one in its specification;
/// the trainer's options are made from it in one place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Rows per micro-batch (per rank).
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub accumulate: usize,
    /// Optimiser steps of the run.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// Learning rate after warm-up.
    pub decay: Decay,
    /// Largest global gradient norm.
    pub grad_clip: f64,
    /// EMA decay of the exported weights.
    pub ema: f64,
    /// Seed of the initial weights, the data order and the noise.
    pub seed: u64,
    /// Steps between validations (0: only at the end).
    pub val_every: u64,
    /// Held-out batches per validation.
    pub val_batches: usize,
    /// Steps between saves (0: only at the end).
    pub save_every: u64,
    /// Search the clipped noise interval at each validation and train with it.
    pub clip_search: bool,
    /// Data-parallel ranks, each on its own device.
    pub world_size: u32,
}

impl Default for Recipe {
    /// The paper's optimiser settings, with a short run's intervals.
    fn default() -> Self {
        Self {
            batch_size: 8,
            accumulate: 1,
            steps: 1000,
            lr: 3e-4,
            warmup: 2500,
            decay: Decay::Constant,
            grad_clip: 1.0,
            ema: 0.9999,
            seed: 0,
            val_every: 0,
            val_batches: 8,
            save_every: 0,
            clip_search: true,
            world_size: 1,
        }
    }
}
