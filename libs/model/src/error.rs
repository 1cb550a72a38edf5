//! The model library's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or serialising a BD3-LM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration or the checkpoint's files: unusable, unreadable or missing.
    #[error(transparent)]
    Config(#[from] bd3lm_config::Error),
    /// A checkpoint file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint file exists but its content is unusable.
    #[error("{path}: {reason}")]
    Checkpoint {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the network needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor {
        /// Full tensor name, e.g. `backbone.blocks.0.attn_qkv.weight`.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        /// Full tensor name.
        name: String,
        /// Shape the configuration implies.
        expected: Vec<usize>,
        /// Shape stored in the checkpoint.
        found: Vec<usize>,
    },
    /// A tensor is stored with a dtype that is not a float type.
    #[error("tensor `{name}`: expected a float dtype (f32, bf16, f16), found {found:?}")]
    TensorDtype {
        /// Full tensor name.
        name: String,
        /// The stored dtype.
        found: candle_core::DType,
    },
    /// An input does not fit the model or the cache it is used with.
    #[error("invalid input: {0}")]
    Input(String),
    /// A serialised KV cache could not be decoded.
    #[error("KV cache bytes: {0}")]
    CacheDecode(String),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A KV segment ended before one of its fields.
impl From<bd3lm_bytes::Truncated> for Error {
    fn from(e: bd3lm_bytes::Truncated) -> Self {
        Error::CacheDecode(e.to_string())
    }
}
