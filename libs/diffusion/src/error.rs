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
    /// The caller cancelled the work.
    #[error("cancelled")]
    Cancelled,
    /// The network failed.
    #[error(transparent)]
    Model(#[from] bd3lm_model::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
