//! The block diffusion algorithm around a BD3-LM network: noise schedules, the SUBS
//! parameterisation, the NELBO loss, and block samplers.
//!
//! Everything here is shared by training and serving; the network itself lives in
//! [`bd3lm_model`].

mod error;
pub mod loss;
pub mod schedule;
pub mod subs;

pub use error::{Error, Result};
pub use schedule::NoiseSchedule;
