//! The error type of training.

use std::path::PathBuf;

/// Errors of data preparation, training and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A data shard or its index is damaged or inconsistent.
    #[error("{}: {reason}", path.display())]
    Shard {
        /// The shard or index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A model configuration, checkpoint layout or shard index that cannot be used.
    #[error(transparent)]
    Config(#[from] bd3lm_config::Error),
    /// A resume state is damaged or does not belong to this run.
    #[error("{}: {reason}", path.display())]
    Resume {
        /// The state directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An option is out of range.
    #[error("{name}: {reason}")]
    Param {
        /// The option.
        name: &'static str,
        /// What is allowed.
        reason: String,
    },
    /// Tokenization failed.
    #[error(transparent)]
    Text(#[from] bd3lm_text::Error),
    /// The network failed.
    #[error(transparent)]
    Model(#[from] bd3lm_model::Error),
    /// The diffusion process failed.
    #[error(transparent)]
    Diffusion(#[from] bd3lm_diffusion::Error),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The judge model failed.
    #[error("judge model: {0}")]
    Judge(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }
}

/// Result of training operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
