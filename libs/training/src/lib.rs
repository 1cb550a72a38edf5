//! Training BD3-LMs (docs/model.md, "Training"): token shards prepared from text, the block diffusion
//! trainer with the paper's optimiser and clipped-schedule search, and evaluation by the
//! perplexity bound and by a real causal LM judging the model's samples.
#![warn(missing_docs)]

mod alloc;
pub mod bound;
pub mod data;
mod error;
pub mod eval;
pub mod judge;
pub mod optim;
pub mod trainer;

pub use alloc::retain_freed_memory;
pub use error::{Error, Result};
pub use trainer::{Event, Init, StepStats, TrainOptions, Trainer, ValStats};

#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
