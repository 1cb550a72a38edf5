//! The block diffusion algorithm around a BD3-LM network: noise schedules, the SUBS
//! parameterisation, the NELBO loss, and block samplers.
//!
//! Everything here is shared by training and serving; the network itself lives in
//! [`bd3lm_model`].
#![warn(missing_docs)]

pub mod dist;
mod error;
pub mod generate;
pub mod loss;
pub mod sampler;
pub mod schedule;
pub mod subs;

pub use error::{Error, Result};
pub use generate::{
    BlockReport, BlockRng, Generation, Session, StopReason, StopRules, block_rng, generate, sigma,
};
pub use sampler::{BlockDenoiser, BlockOutcome, Filter, Sampler, SamplingParams, Step};
pub use schedule::NoiseSchedule;
