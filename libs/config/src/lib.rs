//! What describes a model, its data and its training, as plain data: the layers that
//! never run a network (the coordinator, the training service's validation) read these
//! without linking the tensor library.
//!
//! * [`Config`]: the published `config.json` of a BD3-LM, its validation and the rules
//!   derived from it (the KV window);
//! * [`checkpoint`]: the files of a checkpoint in the Hugging Face layout and the
//!   fingerprint of its weights;
//! * [`shards`]: prepared token shards on disk: their index, reading and checking;
//! * [`Recipe`] and [`Decay`]: what a training run does, shared by `bd3lm train` and the
//!   training service's jobs.
#![warn(missing_docs)]

pub mod checkpoint;
mod error;
mod model;
pub mod shards;
mod training;

pub use error::{Error, Result};
pub use model::{Backbone, Config, Shape};
pub use training::{Decay, Recipe};
