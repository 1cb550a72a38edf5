//! What describes a model, its data and its training, as plain data: the layers that
//! never run a network (the coordinator, the training service's validation) read these
//! without linking the tensor library.
//!
//! * [`Config`]: the published `config.json` of a BD3-LM, its validation and the rules
//!   derived from it (the KV window);
//! * [`checkpoint`]: the files of a checkpoint in the Hugging Face layout and the
//!   fingerprint of its weights;
//! * [`shards`]: prepared token shards on disk: their index, reading and checking;
//! * [`Decay`]: how a training run's learning rate moves after warm-up.
#![warn(missing_docs)]

pub mod checkpoint;
mod error;
mod model;
pub mod shards;
mod training;

pub use error::{Error, Result};
pub use model::{Backbone, Config, Shape};
pub use training::Decay;
