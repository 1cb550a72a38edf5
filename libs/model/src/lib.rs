//! The BD3-LM network ("DiT" backbone) in candle.
//!
//! A BD3-LM is autoregressive over blocks of tokens and a masked diffusion model inside
//! each block. This crate holds the network and nothing of the algorithm around it:
//!
//! * [`Config`]: the published `config.json`;
//! * [`checkpoint`]: loading and saving the Hugging Face layout (`model.safetensors`,
//!   sharded or not, f32/bf16/f16);
//! * [`Bd3lm`]: the network with its three forward modes: the vectorised training pass
//!   over `[x_t ; x_0]`, the KV-cached denoise and commit passes used when sampling, and the
//!   uncached block-causal pass;
//! * [`KvCache`]: keys and values of committed blocks, with a sliding window and a
//!   byte serialisation.

pub mod checkpoint;
mod config;
mod error;
mod kv_cache;
mod layers;
pub mod mask;
mod model;
mod ops;

pub use config::{Config, FREQUENCY_EMBEDDING_SIZE};
pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use model::Bd3lm;
