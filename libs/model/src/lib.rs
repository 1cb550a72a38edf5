//! The BD3-LM network ("DiT" backbone) in candle.
//!
//! A BD3-LM is autoregressive over blocks of tokens and a masked diffusion model inside
//! each block. This crate holds the network and nothing of the algorithm around it:
//!
//! * [`Config`]: the published `config.json` (plain data, from `bd3lm-config`);
//! * [`checkpoint`]: loading and saving the Hugging Face layout (`model.safetensors`,
//!   sharded or not, f32/bf16/f16);
//! * [`Bd3lm`]: the network with its three forward modes: the vectorised training pass
//!   over `[x_t ; x_0]`, the KV-cached denoise and commit passes used when sampling, and the
//!   uncached block-causal pass;
//! * [`KvCache`]: keys and values of committed blocks, with a sliding window and a
//!   byte serialisation.
#![warn(missing_docs)]

mod attention;
pub mod checkpoint;
mod error;
pub mod host;
mod kv_cache;
mod layers;
pub mod mask;
mod model;
mod ops;

pub use bd3lm_config::{Backbone, Config, Shape};
pub use error::{Error, Result};
pub use host::{Workload, set_host_threads};
pub use kv_cache::{KvCache, SharedKv};
pub use layers::FREQUENCY_EMBEDDING_SIZE;
pub use model::{Bd3lm, BlockInput};

#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::{DType, Device, Tensor};

    use crate::{Backbone, Bd3lm, Config, Shape, checkpoint};

    /// A small config whose context (24) is not a power of two.
    pub fn small_config(block_size: usize) -> Config {
        Config::new(Shape {
            vocab_size: 64,
            model_length: 24,
            block_size,
            backbone: Backbone::TOY,
        })
    }

    pub fn small_model(cfg: &Config) -> Bd3lm {
        checkpoint::random_model(cfg, 0.2, 7, DType::F32, &Device::Cpu).unwrap()
    }

    /// Deterministic pseudo-random ids below `vocab - 1` (never the mask id).
    pub fn tokens(batch: usize, len: usize, vocab: usize, salt: usize) -> Tensor {
        let ids: Vec<u32> = (0..batch * len)
            .map(|i| ((i * 7919 + salt * 104729) % (vocab - 1)) as u32)
            .collect();
        Tensor::from_vec(ids, (batch, len), &Device::Cpu).unwrap()
    }

    pub fn zeros(batch: usize) -> Tensor {
        Tensor::zeros(batch, DType::F32, &Device::Cpu).unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }
}
