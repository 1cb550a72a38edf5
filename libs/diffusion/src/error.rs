//! The diffusion library's error type.

/// Errors of the diffusion algorithm.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter is outside its valid range; the message names it.
    #[error("invalid parameter `{name}`: {reason}")]
    Param {
        /// The parameter's name as users spell it (`top_p`, `steps`, ...).
        name: &'static str,
        /// What was expected and what was found.
        reason: String,
    },
    /// A sampling parameter is outside its valid range.
    #[error(transparent)]
    Sampling(#[from] bd3lm_sampling::ParamError),
    /// The caller cancelled the work.
    #[error("cancelled")]
    Cancelled,
    /// The network failed.
    #[error(transparent)]
    Model(#[from] bd3lm_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A batched pass this work shared failed; the message is the pass's error.
    #[error("batched pass failed: {0}")]
    Batch(String),
}

impl Error {
    /// True when the input is at fault (a parameter, a block, tokens), so running the
    /// same work elsewhere cannot succeed; false for a compute failure or cancellation.
    pub fn is_request_fault(&self) -> bool {
        match self {
            Self::Param { .. } | Self::Sampling(_) => true,
            Self::Cancelled | Self::Model(_) | Self::Candle(_) | Self::Batch(_) => false,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
