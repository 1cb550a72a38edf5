//! The model configuration, read straight from a checkpoint's `config.json`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Hyper-parameters of a BD3-LM, with the field names of the published `config.json`.
///
/// Fields this crate does not use (`transformers_version`, `return_dict`, ...) are kept in
/// [`Config::extra`] so that a loaded config is written back unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Always `"bd3lm"`.
    pub model_type: String,
    /// Number of token ids, `[MASK]` included.
    pub vocab_size: usize,
    /// Hidden width `d`.
    pub hidden_dim: usize,
    /// Attention heads `h`; the head dimension is `d / h`.
    pub n_heads: usize,
    /// Number of transformer layers.
    pub n_blocks: usize,
    /// Width `c` of the conditioning vector.
    pub cond_dim: usize,
    /// Context length `n` the model was trained with (the sliding window when sampling).
    pub model_length: usize,
    /// Block length `L'`.
    pub block_size: usize,
    /// Adaptive layer norm modulation by the noise level (true for the published models).
    #[serde(default = "default_true")]
    pub adaln: bool,
    /// Feed the noise level to the network; when false, sigma is replaced by zeros.
    #[serde(default)]
    pub time_conditioning: bool,
    /// Dropout probability used in training.
    #[serde(default)]
    pub dropout: f64,
    /// Vectorised `[x_t ; x_0]` training (always true for BD3-LM checkpoints).
    #[serde(default = "default_true")]
    pub cross_attn: bool,
    /// The reference's attention backend name; informational here.
    #[serde(default = "default_attn_backend")]
    pub attn_backend: String,
    /// Plain causal attention; only false is supported.
    #[serde(default)]
    pub causal: bool,
    /// Whether the checkpoint carries a learned clipped noise interval.
    #[serde(default = "default_true")]
    pub var_min: bool,
    /// Lower end of the clipped noise interval.
    #[serde(default = "default_eps_min")]
    pub sampling_eps_min: f64,
    /// Upper end of the clipped noise interval.
    #[serde(default = "default_eps_max")]
    pub sampling_eps_max: f64,
    /// Id of `[MASK]`; absent in the published configs, where it is `vocab_size - 1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_token_id: Option<u32>,
    /// Every other field of `config.json`, kept verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_true() -> bool {
    true
}
fn default_attn_backend() -> String {
    "sdpa".to_string()
}
fn default_eps_min() -> f64 {
    1e-3
}
fn default_eps_max() -> f64 {
    1.0
}

/// The transformer's size: what a new network chooses; its vocabulary and lengths come
/// from the data it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backbone {
    /// Hidden width `d`.
    pub hidden_dim: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Transformer layers.
    pub n_blocks: usize,
    /// Width of the conditioning vector.
    pub cond_dim: usize,
}

impl Backbone {
    /// The toy network that unit tests build (d 32, 4 heads, 2 layers, cond 16): every
    /// path of a real one, at a size that runs in milliseconds.
    pub const TOY: Self = Self {
        hidden_dim: 32,
        n_heads: 4,
        n_blocks: 2,
        cond_dim: 16,
    };
}

/// Everything a config's network is sized by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Number of token ids, `[MASK]` included.
    pub vocab_size: usize,
    /// Context length `n` of training.
    pub model_length: usize,
    /// Block size `L'`.
    pub block_size: usize,
    /// The transformer's size.
    pub backbone: Backbone,
}

impl Config {
    /// A config of `shape` with every other field at its published default.
    pub fn new(shape: Shape) -> Self {
        let Backbone {
            hidden_dim,
            n_heads,
            n_blocks,
            cond_dim,
        } = shape.backbone;
        Self {
            model_type: "bd3lm".to_string(),
            vocab_size: shape.vocab_size,
            hidden_dim,
            n_heads,
            n_blocks,
            cond_dim,
            model_length: shape.model_length,
            block_size: shape.block_size,
            adaln: true,
            time_conditioning: false,
            dropout: 0.0,
            cross_attn: true,
            attn_backend: default_attn_backend(),
            causal: false,
            var_min: true,
            sampling_eps_min: default_eps_min(),
            sampling_eps_max: default_eps_max(),
            mask_token_id: None,
            extra: serde_json::Map::new(),
        }
    }

    /// The "tiny" benchmark shape: d 256, 8 layers, 8 heads, cond 64, GPT-2 vocabulary
    /// plus `[MASK]`, context 1024.
    pub fn tiny(block_size: usize) -> Self {
        Self::gpt2(
            block_size,
            Backbone {
                hidden_dim: 256,
                n_heads: 8,
                n_blocks: 8,
                cond_dim: 64,
            },
        )
    }

    /// The paper's "small" shape with the GPT-2 vocabulary: d 768, 12 heads, 12 layers,
    /// context 1024.
    pub fn small(block_size: usize) -> Self {
        Self::gpt2(
            block_size,
            Backbone {
                hidden_dim: 768,
                n_heads: 12,
                n_blocks: 12,
                cond_dim: 128,
            },
        )
    }

    fn gpt2(block_size: usize, backbone: Backbone) -> Self {
        Self::new(Shape {
            vocab_size: 50258,
            model_length: 1024,
            block_size,
            backbone,
        })
    }

    /// Parses and validates a `config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(Error::ConfigJson)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_dim / self.n_heads
    }

    /// Id of the `[MASK]` token.
    pub fn mask_id(&self) -> u32 {
        self.mask_token_id.unwrap_or(self.vocab_size as u32 - 1)
    }

    /// Most tokens of KV state a session keeps: a block is denoised attending to at most
    /// `model_length - block_size` earlier tokens, so that it and its context fit the
    /// context the model was trained with (the reference's sliding window).
    pub fn kv_window(&self) -> usize {
        self.model_length - self.block_size
    }

    /// Checks that this configuration describes a network that can be built.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &'static str, reason: String| Err(Error::Config { field, reason });
        if self.model_type != "bd3lm" {
            return invalid(
                "model_type",
                format!("expected \"bd3lm\", found {:?}", self.model_type),
            );
        }
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_dim", self.hidden_dim),
            ("n_heads", self.n_heads),
            ("n_blocks", self.n_blocks),
            ("cond_dim", self.cond_dim),
            ("model_length", self.model_length),
            ("block_size", self.block_size),
        ] {
            if value == 0 {
                return invalid(field, "expected a positive value, found 0".to_string());
            }
        }
        if self.vocab_size < 2 || self.vocab_size > u32::MAX as usize {
            return invalid(
                "vocab_size",
                format!("expected 2..2^32, found {}", self.vocab_size),
            );
        }
        if !self.hidden_dim.is_multiple_of(self.n_heads) {
            return invalid(
                "hidden_dim",
                format!(
                    "expected a multiple of n_heads ({}), found {}",
                    self.n_heads, self.hidden_dim
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return invalid(
                "hidden_dim",
                format!(
                    "expected an even head dimension for rotary embeddings, found {}",
                    self.head_dim()
                ),
            );
        }
        if !self.model_length.is_multiple_of(self.block_size) {
            return invalid(
                "model_length",
                format!(
                    "expected a multiple of block_size ({}), found {}",
                    self.block_size, self.model_length
                ),
            );
        }
        if self.causal {
            return invalid(
                "causal",
                "expected false: causal BD3-LMs are not supported".to_string(),
            );
        }
        if !self.cross_attn {
            return invalid(
                "cross_attn",
                "expected true: BD3-LMs train on [x_t ; x_0]".to_string(),
            );
        }
        if !(0.0..=1.0).contains(&self.dropout) {
            return invalid("dropout", format!("expected 0..=1, found {}", self.dropout));
        }
        if !(0.0 <= self.sampling_eps_min
            && self.sampling_eps_min < self.sampling_eps_max
            && self.sampling_eps_max <= 1.0)
        {
            return invalid(
                "sampling_eps_min",
                format!(
                    "expected 0 <= sampling_eps_min < sampling_eps_max <= 1, found {} and {}",
                    self.sampling_eps_min, self.sampling_eps_max
                ),
            );
        }
        if let Some(id) = self.mask_token_id
            && id as usize >= self.vocab_size
        {
            return invalid(
                "mask_token_id",
                format!(
                    "expected an id below vocab_size ({}), found {id}",
                    self.vocab_size
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_config() -> &'static str {
        r#"{"adaln": true, "attn_backend": "sdpa", "block_size": 4, "causal": false,
            "cond_dim": 64, "cross_attn": true, "dropout": 0.0, "hidden_dim": 128,
            "model_length": 64, "model_type": "bd3lm", "n_blocks": 2, "n_heads": 4,
            "return_dict": false, "sampling_eps_max": 0.999, "sampling_eps_min": 0.001,
            "time_conditioning": false, "transformers_version": "4.49.0", "var_min": true,
            "vocab_size": 1024}"#
    }

    #[test]
    fn parses_published_layout_and_keeps_unknown_fields() {
        let cfg = Config::from_json(fixture_config()).unwrap();
        assert_eq!(cfg.head_dim(), 32);
        assert_eq!(cfg.mask_id(), 1023);
        assert_eq!(cfg.extra["transformers_version"], "4.49.0");
        let back: Config = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn rejects_unworkable_configs_naming_the_field() {
        let base = Config::from_json(fixture_config()).unwrap();
        type Mutation = fn(&mut Config);
        let cases: Vec<(Mutation, &str)> = vec![
            (|c| c.hidden_dim = 130, "hidden_dim"),
            (|c| c.model_length = 66, "model_length"),
            (|c| c.model_type = "gpt2".into(), "model_type"),
            (|c| c.n_heads = 0, "n_heads"),
            (|c| c.mask_token_id = Some(5000), "mask_token_id"),
        ];
        for (mutate, field) in cases {
            let mut cfg = base.clone();
            mutate(&mut cfg);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
            assert!(err.contains("expected") && err.contains("found"), "{err}");
        }
    }
}
